"""Activation statistics for least-squares fusion, gathered by forward pre-hooks (no activation is kept).

For a layer ``y = W x`` (Linear, or Conv2d seen on unfolded patches) and concepts ``i`` whose LoRA on that
layer is ``a_i dW_i = U_i D_i`` (``U_i [out, r_i]`` already scaled by ``a_i * alpha_i / r_i``, ``D_i [r_i, in]``),
the fusion objective ``sum_i ||W X_i - (W0 + U_i D_i) X_i||^2`` needs only

* ``G = sum_i X_i X_i^T``          ``[in, in]``, over every concept's tokens, and
* ``P_i = D_i X_i X_i^T``         ``[r_i, in]``, over concept ``i``'s own tokens,

because ``sum_i (W0 + U_i D_i) G_i = W0 G + sum_i U_i P_i``. A hook sees one batch of inputs ``X`` at a time and
adds ``X X^T`` to ``G`` and ``(D_c X) X^T`` to ``P_c`` of the concept ``c`` being run, in float64. Memory is
``in^2 + sum_i r_i in`` numbers per layer, whatever the number of tokens or sampling steps.

Token rows: a text-side layer (text encoder, cross-attention ``to_k``/``to_v``) sees ``[B, S, d]`` inputs, one row
per token position. ``collector.rows`` (a ``[B, S]`` boolean mask, see :func:`token_rows`) keeps only the chosen
positions, so padding never enters the statistics. Masks of ``B`` prompts also apply to ``k * B`` rows (ED-LoRA's
layer copies of a batch, copy-major).

``keep_inputs=True`` also keeps the raw inputs per concept (for the LBFGS reference in tools/ and the tests
only; never in the product path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def flat_inputs(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer multiplies by its (flattened) weight.

    Args:
        module: ``nn.Linear`` or ``nn.Conv2d`` (groups 1).
        x: its input, ``[..., in]`` for Linear, ``[B, C, H, W]`` for Conv2d.
    Returns:
        ``[n, in]`` for Linear; ``[n, C*kh*kw]`` (unfolded patches, the order of ``weight.flatten(1)``) for Conv2d.
    """
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped convolutions (groups={module.groups}) are not supported by gradient fusion")
        if module.padding_mode != "zeros":
            raise ValueError(f"conv padding_mode {module.padding_mode!r} is not supported by gradient fusion")
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        if tuple(k) == (1, 1) and tuple(s) == (1, 1) and tuple(p) == (0, 0):
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [B, C*kh*kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def projected_inputs(module: torch.nn.Module, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down @ flat_inputs(module, x).T`` transposed, ``[n, R]``, without unfolding a conv's patches: the inputs
    seen through the stacked LoRA down matrices ``down [R, in_flat]`` (for a Conv2d: ``conv2d(x, down)``)."""
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped convolutions (groups={module.groups}) are not supported by gradient fusion")
        w = down.reshape(down.shape[0], *module.weight.shape[1:]).to(x.dtype)
        pad = module.padding if module.padding_mode == "zeros" else None
        if pad is None:
            raise ValueError(f"conv padding_mode {module.padding_mode!r} is not supported by gradient fusion")
        z = F.conv2d(x, w, None, module.stride, pad, module.dilation)  # [B, R, H', W']
        return z.permute(0, 2, 3, 1).reshape(-1, down.shape[0])
    return x.reshape(-1, x.shape[-1]) @ down.to(x.dtype).T


def _find(seq: list[int], sub: list[int]) -> list[int]:
    """Start positions of ``sub`` in ``seq``."""
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if n and seq[i : i + n] == sub]


def token_rows(tokenizer, prompts: list[str], mode: str, concept_ids: set[int] | None = None,
               trigger: str | None = None) -> torch.Tensor:
    """Which token positions of each prompt a text-side layer's statistics use.

    Args:
        tokenizer: the pipeline's CLIP tokenizer (prompts are padded to ``model_max_length`` as the pipeline does).
        prompts: ``B`` prompts.
        mode: ``all`` (every position, padding included), ``prompt`` (start token .. first end token, no padding:
            the Mix-of-Show reference's text-encoder rows) or ``concept`` (the concept's tokens + the first end
            token: the reference's to_k/to_v rows).
        concept_ids: ED-LoRA pseudo-word token ids (concept tokens for ``concept``).
        trigger: plain LoRAs: the trigger word(s), comma-separated; their tokens are the concept tokens.
    Returns:
        ``[B, S]`` bool. In ``concept`` mode a prompt without any concept token keeps only its end token.
    """
    if mode not in ("all", "prompt", "concept"):
        raise ValueError(f"token rows {mode!r}: expected all, prompt or concept")
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    eos = tokenizer.eos_token_id
    subs = []
    for word in (trigger or "").split(","):
        word = word.strip()
        if word:
            subs.append(tokenizer(word, add_special_tokens=False).input_ids)
    mask = torch.zeros(len(ids), len(ids[0]), dtype=torch.bool)
    for b, row in enumerate(ids):
        end = row.index(eos) if eos in row else len(row) - 1
        if mode == "all":
            mask[b] = True
        elif mode == "prompt":
            mask[b, : end + 1] = True
        else:
            mask[b, end] = True
            for pos, t in enumerate(row[:end]):
                if concept_ids and t in concept_ids:
                    mask[b, pos] = True
            for sub in subs:
                for start in _find(row[:end], sub):
                    mask[b, start : start + len(sub)] = True
    return mask


def select_rows(x: torch.Tensor, rows: torch.Tensor | slice | None, batch: int | None = None) -> torch.Tensor:
    """``x [k*B, S, d]`` restricted to the positions ``rows [B, S]`` marks -> ``[n, d]``, or ``x [k*B, ...]``
    restricted to the batch entries ``rows [B]`` marks (or the ``slice`` ``rows`` of each of the ``k`` copies of a
    batch of ``batch`` prompts); ``x`` as is when ``rows`` is None. Raises RuntimeError when the shapes do not fit
    (a capture set up for other prompts)."""
    if rows is None:
        return x
    if isinstance(rows, slice):
        if not batch or x.shape[0] % batch:
            raise RuntimeError(f"batch slice of {batch} prompts does not fit layer input {tuple(x.shape)}")
        if x.shape[0] == batch:
            return x[rows]
        return torch.cat([x[j * batch :][rows] for j in range(x.shape[0] // batch)], 0)
    if rows.dim() == 1:
        if x.shape[0] % rows.shape[0]:
            raise RuntimeError(f"batch-row mask {tuple(rows.shape)} does not fit layer input {tuple(x.shape)}")
        return x[rows.to(x.device).repeat(x.shape[0] // rows.shape[0])]
    if x.dim() != 3 or x.shape[1] != rows.shape[1] or x.shape[0] % rows.shape[0]:
        raise RuntimeError(f"token-row mask {tuple(rows.shape)} does not fit layer input {tuple(x.shape)}")
    return x[rows.to(x.device).repeat(x.shape[0] // rows.shape[0], 1)]


def concept_runs(owners: list[int], n: int) -> list[tuple[int, int, int]]:
    """``(concept, start, stop)``: the runs of consecutive prompts of one concept (``owners``: one concept per prompt
    of a batch, -1 = skip) in a layer input of ``n`` rows (``k`` copies of the batch, copy-major: CFG, ED-LoRA's
    layer copies), so each run is a view of the input, not a copy. Runs never span two copies."""
    B = len(owners)
    if n % B:
        raise RuntimeError(f"concepts of {B} prompts do not fit a layer input of {n} rows")
    runs: list[tuple[int, int, int]] = []
    for j in range(n // B):
        for b, c in enumerate(owners):
            if c < 0:
                continue
            if b > 0 and runs and runs[-1][0] == c and runs[-1][2] == j * B + b:
                runs[-1] = (c, runs[-1][1], j * B + b + 1)
            else:
                runs.append((c, j * B + b, j * B + b + 1))
    return runs


@dataclass
class LayerStats:
    """Accumulated statistics of one layer (see the module docstring).

    ``G [in, in]``, ``P {concept: [r, in]}``, ``tokens`` (rows seen), all on ``device`` in float64.
    """

    G: torch.Tensor
    P: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: torch.Tensor = None  # float64 scalar tensor, so it reduces across processes with the rest
    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class GramCollector:
    """Register pre-hooks on layers of a model and accumulate :class:`LayerStats` for the current concept.

    Args:
        model: the model holding the layers (a UNet or a text encoder).
        layers: ``{name: (module path in model, {concept: D_i [r_i, in_flat]})}``; ``name`` is the caller's key.
        device: where the statistics live (the model's device).
        keep_inputs: also keep raw flattened inputs per concept (reference/test use only).
        gram: accumulate ``G``/``P`` (False: keep inputs only, for timing the reference's recipe alone).

    follow: another collector of the same layers (e.g. the fit statistics when this one holds the held-out ones):
        its hooks record for both, so each layer input is flattened once.
    project: ``{name: down [R, in_flat]}``: record those layers' inputs seen through ``down``
        (:func:`projected_inputs`), so their ``G`` is ``[R, R]`` (the LoRA-subspace solve of large convs); their
        ``{concept: D_i}`` are then ``[r_i, R]``.

    Use ``with collector:`` around forward passes and ``collector.concept = i`` to say whose activations run, or
    ``collector.owners`` (``[B]``, one concept per prompt, -1 for prompts not to record) for a batch that mixes
    concepts.
    """

    def __init__(self, model, layers: dict, device=None, keep_inputs: bool = False, gram: bool = True,
                 project: dict[str, torch.Tensor] | None = None, follow: GramCollector | None = None):
        self.model = model
        self._leader = follow
        self._group = [self]
        if follow is not None:
            if follow.layers.keys() != layers.keys():
                raise ValueError("a following collector records the same layers as its leader")
            follow._group.append(self)
        self.project = dict(project or {})
        self.gram = gram
        self.layers = layers
        self.keep_inputs = keep_inputs
        self.concept: int | None = None
        # or, for a batch of several concepts: ``[B]`` concept of each prompt (-1: not recorded); ``rows`` is then
        # None or a ``[B, S]`` token-row mask
        self.owners = None
        # rows wait in a float64 buffer until a layer has ``_flush_rows`` of them (at most about the size of its
        # Gram matrix, or 1 MiB): small per-call products cost more in overhead than in arithmetic
        self._buffers: dict[str, list] = {}
        self._buffered: dict[str, int] = {}
        self._flush_rows: dict[str, int] = {}
        # [B, S] token-row mask of the prompts running (text-side layers), or [B] mask / slice of the prompts to
        # record out of ``batch`` prompts (see :func:`select_rows`)
        self.rows: torch.Tensor | slice | None = None
        self.batch: int | None = None
        self.device = device
        self.stats: dict[str, LayerStats] = {}
        self._downs: dict[str, dict[int, torch.Tensor]] = {}
        self._handles = []
        for name, (path, downs) in layers.items():
            module = model.get_submodule(path)
            dev = device or module.weight.device
            dim = self.project[name].shape[0] if name in self.project else module.weight[0].numel()
            self.stats[name] = LayerStats(
                G=torch.zeros(dim, dim, dtype=torch.float64, device=dev),
                P={c: torch.zeros(d.shape[0], dim, dtype=torch.float64, device=dev) for c, d in downs.items()},
                tokens=torch.zeros((), dtype=torch.float64, device=dev),
            )
            self._downs[name] = {c: d.to(device=dev, dtype=torch.float64) for c, d in downs.items()}
            self._flush_rows[name] = max(dim, (1 << 17) // max(dim, 1))
            if name in self.project:
                self.project[name] = self.project[name].to(device=dev, dtype=torch.float32)

    @property
    def owners(self) -> list[int] | None:
        return self._owners

    @owners.setter
    def owners(self, value) -> None:
        self._owners = None if value is None else [int(o) for o in value]
        self._runs = {}

    def _runs_of(self, n: int) -> list[tuple[int, int, int]]:
        if n not in self._runs:
            self._runs[n] = concept_runs(self._owners, n)
        return self._runs[n]

    def _selected(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """The rows of ``x`` to record, as ``(concept, rows)`` pieces."""
        if self._owners is None:
            return [] if self.concept is None else [(self.concept, select_rows(x, self.rows, self.batch))]
        pieces = []
        for c, start, stop in self._runs_of(x.shape[0]):
            part = x[start:stop]
            if self.rows is not None:  # [B, S] token rows of the batch
                if x.dim() != 3 or x.shape[1] != self.rows.shape[1]:
                    raise RuntimeError(f"token-row mask {tuple(self.rows.shape)} does not fit layer input "
                                       f"{tuple(x.shape)}")
                b0 = start % len(self._owners)
                part = part[self.rows[b0 : b0 + stop - start].to(x.device)]
            pieces.append((c, part))
        return pieces

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            whole = None
            for coll in self._group:
                if coll._owners is not None and coll.rows is None:
                    # whole prompts: flatten the input once for every split and take each run's rows as a view
                    if whole is None:
                        down = self.project.get(name)
                        whole = (flat_inputs(module, x) if down is None else projected_inputs(module, x, down)).to(
                            torch.float64, copy=True)  # a copy: later in-place ops cannot change it
                        per = whole.shape[0] // x.shape[0]
                    coll._add(name, [(c, whole[s * per : e * per]) for c, s, e in coll._runs_of(x.shape[0])])
                else:
                    down = self.project.get(name)
                    coll._add(name, [(c, (flat_inputs(module, part) if down is None else projected_inputs(
                        module, part, down)).to(torch.float64, copy=True))
                        for c, part in coll._selected(x) if part.shape[0]])

        return hook

    def _add(self, name: str, pieces: list[tuple[int, torch.Tensor]]) -> None:
        if not pieces:
            return
        buf = self._buffers.setdefault(name, [])
        for c, flat in pieces:
            buf.append((c, flat))
            self._buffered[name] = self._buffered.get(name, 0) + flat.shape[0]
        if self._buffered[name] >= self._flush_rows[name]:
            self._flush(name)

    def _flush(self, name: str) -> None:
        """Add the buffered rows of one layer to its statistics (one product per concept, not one per call)."""
        buf = self._buffers.pop(name, [])
        self._buffered[name] = 0
        if not buf:
            return
        st = self.stats[name]
        by_concept: dict[int, list[torch.Tensor]] = {}
        for c, x in buf:
            by_concept.setdefault(c, []).append(x)
        for c, parts in by_concept.items():
            x = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            st.tokens += x.shape[0]
            if self.gram:
                st.G.addmm_(x.T, x)
                d = self._downs[name].get(c)
                if d is not None:
                    st.P[c].addmm_(d @ x.T, x)
            if self.keep_inputs:
                st.inputs.setdefault(c, []).append(x.cpu())

    def flush(self) -> None:
        """Add every buffered row to the statistics (done on leaving the ``with`` block)."""
        for name in list(self._buffers):
            self._flush(name)

    def __enter__(self):
        if self._leader is not None:  # the leader's hooks record for this collector too
            return self
        for name, (path, _) in self.layers.items():
            module = self.model.get_submodule(path)
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.flush()
        self.concept = None
        self.owners = None
        self.rows = None
        self.batch = None
        return False

    def reduce(self) -> None:
        """Sum the statistics over all processes (no-op in a single process), via accelerate."""
        from accelerate import PartialState
        from accelerate.utils import reduce

        if PartialState().num_processes == 1:
            return
        for st in self.stats.values():
            st.G = reduce(st.G, reduction="sum")
            st.tokens = reduce(st.tokens, reduction="sum")
            for c in sorted(st.P):
                st.P[c] = reduce(st.P[c], reduction="sum")
