"""The audit itself: load a model, trace one train-mode forward pass, classify every dropout."""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from .rules import _bn_merges, _classify, _Graph
from .tracer import _Tracer
from .vocabulary import AuditError, AuditReport

# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------

def load_model(spec: str | nn.Module, **kwargs: Any) -> Tuple[nn.Module, str]:
    """A model from an ``nn.Module``, a timm name or a saved folder.

    Args:
        spec: an ``nn.Module``, a timm model name (``resnet50``, ``resnet50_dropres.a1_in1k``) or
            ``local-dir:<folder>`` (a folder with ``config.json`` and weights).
        **kwargs: passed to ``timm.create_model`` when ``spec`` is a name.

    Returns:
        ``(model, label)``.

    Raises:
        AuditError: unknown name, a folder without ``config.json``, keywords given with a module, or a
            build that fails.
    """
    if isinstance(spec, nn.Module):
        if kwargs:
            raise AuditError(f'model keywords {sorted(kwargs)} only apply to a timm model name; '
                             f'got an nn.Module ({type(spec).__name__}) already built')
        return spec, type(spec).__name__
    if not isinstance(spec, str) or not spec:
        raise AuditError(f'model must be an nn.Module, a timm model name or local-dir:<folder>, got {spec!r}')
    import timm

    import timm_dropres  # noqa: F401  (registers *_dropres and the CIFAR networks)

    from ...models.reference import ModelRef

    try:
        ref = ModelRef.parse(spec)
    except (FileNotFoundError, ValueError) as e:  # no such folder, no config.json, a name timm cannot parse
        raise AuditError(f'{spec!r}: {e}') from None
    if ref.is_folder:
        try:
            return timm.create_model(spec, pretrained=ref.loads_weights(), **kwargs), spec
        except Exception as e:  # noqa: BLE001 - turned into one clear message
            raise AuditError(f'could not build {spec!r}: {type(e).__name__}: {e}') from e
    if ref.hub_id is not None:  # timm reads the repository from the Hub, or from the local HF cache
        try:
            return timm.create_model(spec, pretrained=ref.loads_weights(), **kwargs), spec
        except Exception as e:  # noqa: BLE001 - what timm / huggingface_hub said, in one line
            said = (str(e).strip().splitlines() or [''])[0][:300]
            raise AuditError(f'could not build {spec!r}: {type(e).__name__}: {said} (timm reads that repository '
                             f'from the Hub, or from the local cache when HF_HUB_OFFLINE=1; '
                             f'local-dir:<folder> reads a saved folder)') from e
    if ref.architecture is None or not timm.is_model(ref.architecture):
        import difflib
        close = difflib.get_close_matches(ref.architecture or '', timm.list_models(), n=5, cutoff=0.6)
        hint = f'closest names: {close}' if close else 'see timm.list_models()'
        raise AuditError(f'unknown model {spec!r}: not a registered timm model ({hint})')
    try:
        return timm.create_model(spec, pretrained=ref.loads_weights(), **kwargs), spec
    except Exception as e:  # noqa: BLE001
        raise AuditError(f'could not build {spec!r} with {kwargs}: {type(e).__name__}: {e}') from e


def _input_shape(model: nn.Module, input_size: Sequence[int] | None, batch_size: int,
                 model_kwargs: Dict[str, Any]) -> Tuple[int, ...]:
    if input_size is None:
        from timm.data import resolve_model_data_config

        # the create_model keywords that change the input the model expects
        args = {k: model_kwargs[k] for k in ('img_size', 'in_chans') if isinstance(model_kwargs.get(k), int)}
        input_size = resolve_model_data_config(model, args=args)['input_size']
        if 'in_chans' in args:
            input_size = (args['in_chans'], *input_size[1:])
    shape = tuple(int(s) for s in input_size)
    if len(shape) != 3 or min(shape) < 1:
        raise AuditError(f'input_size must be (C, H, W) with positive sizes, got {tuple(input_size)}')
    return (batch_size, *shape)


def _check_forward(module: nn.Module, label: str) -> None:
    """One image batch must be enough: refuse forwards that need other inputs, with a clear message."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    if not positional or len(required) > 1:
        sig = ', '.join(p.name for p in params)
        raise AuditError(
            f'{label}.forward({sig}) needs {"no input" if not positional else "inputs " + str(required)}: the '
            'audit feeds one image batch (B, C, H, W), so models whose forward needs other inputs (token ids, '
            'masks, several tensors) are not supported; wrap the model in a module whose forward(x) builds them')


def audit(
        model: str | nn.Module,
        *,
        input_size: Sequence[int] | None = None,
        batch_size: int = 2,
        **model_kwargs: Any,
) -> AuditReport:
    """Trace ``model`` once and classify every dropout-like op (see :data:`LOCATIONS`, :data:`VERDICTS`).

    Args:
        model: an ``nn.Module``, a timm model name or ``local-dir:<folder>`` (see :func:`load_model`).
        input_size: ``(C, H, W)`` of the traced input; by default what
            ``timm.data.resolve_model_data_config`` gives for the model (``img_size`` / ``in_chans`` keywords
            taken into account).
        batch_size: traced batch size, at least 2 (BatchNorm in train mode needs two values).
        **model_kwargs: passed to ``timm.create_model`` when ``model`` is a name.

    Returns:
        The report, one entry per dropout-like op in execution order.

    Raises:
        AuditError: the model cannot be built, its forward needs other inputs than one image batch, or the
            traced forward pass raises (one line, with what to try).
    """
    if batch_size < 2:
        raise AuditError(
            f'batch_size must be >= 2 (BatchNorm needs more than one value in train mode), got {batch_size}')
    module, label = load_model(model, **model_kwargs)
    _check_forward(module, label)
    shape = _input_shape(module, input_size, batch_size, model_kwargs)
    named = list(module.named_modules())
    names = {m: (n or type(module).__name__) for n, m in named}
    tracer = _Tracer(names, module)
    was_training = [m for _, m in named if m.training]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    # process-wide module hooks: two registrations instead of two per module
    handles = [register_module_forward_pre_hook(tracer.pre_hook), register_module_forward_hook(tracer.post_hook)]
    try:
        device = next(iter(module.parameters()), torch.empty(0)).device
        if len(was_training) < len(named):
            module.train()
        forked = [] if device.type in ('cpu', 'meta') else [device]
        with torch.random.fork_rng(devices=forked):                 # the input and the dropout masks
            x = torch.randn(shape, device=device)
            tracer.source(x)
            with torch.no_grad(), tracer:
                module(x)
    except Exception as e:  # noqa: BLE001 - any failure of a user model becomes one clear message
        raise AuditError(
            f'could not trace {label}: a train-mode forward pass on a random input of shape {tuple(shape)} raised '
            f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}. The audit feeds one float image '
            'batch; if the model needs another size, pass input_size=(C, H, W) (CLI: --input-size C H W); '
            'models whose forward needs other inputs (token ids, masks) are not supported.') from e
    finally:
        for h in handles:
            h.remove()
        if len(was_training) < len(named):
            module.eval()
            for m in was_training:
                m.training = True
        with torch.no_grad(), contextlib.suppress(Exception):
            for b, saved in buffers:
                b.copy_(saved)

    graph = _Graph(tracer.nodes, tracer.outputs)
    drops = [n for n in tracer.nodes if n.kind == 'dropout']
    entries = [_classify(n, graph, i) for i, n in enumerate(drops)]
    has_bn = any(n.kind == 'bn' for n in tracer.nodes)
    return AuditReport(model=label, input_shape=tuple(shape), entries=entries, has_bn=has_bn,
                       bn_merges=_bn_merges(graph))


