"""Forward hooks that hand one intermediate hidden state of a diffusers model to a regularizer.

REPA (``kind="dit"``) taps transformer block ``block_index``; U-REPA (``kind="unet"``) taps
``UNet2DConditionModel.mid_block``. Either way ``Capture.pop()`` returns the image tokens of the last
forward, (B, N, C) row-major on their grid (H, W), still attached to the autograd graph.

How each family is read. Blocks are numbered across the listed ModuleLists in the order the forward runs
them; the valid range is ``[0, num_blocks(model))`` (negative indices are rejected). "Tuple" is the element
taken from blocks that return two streams; "joint" is where the image tokens sit in a text+image sequence.

- Flux, Flux2, Chroma: ``transformer_blocks`` then ``single_transformer_blocks``; tuple [1]; joint: the
  last N tokens (text first).
- AuraFlow: ``joint_transformer_blocks`` then ``single_transformer_blocks``; as Flux (register tokens and
  text first).
- SD3: ``transformer_blocks``; tuple [1].
- HiDreamImage: ``double_stream_blocks`` then ``single_stream_blocks``; tuple [0]; joint: the first N tokens
  (image first, then padding up to ``max_seq`` for non-square latents, then text).
- Lumina2: ``layers`` (the joint blocks, not the refiners); joint: per sample, the N tokens after its valid
  caption tokens (``encoder_attention_mask``), gathered on device.
- Sana, PixArt, DiT: ``transformer_blocks``; the output is the image tokens.
- UNet2DConditionModel (SD1.5, SDXL, Kolors): ``mid_block``; (B, C, H, W) -> (B, H·W, C).

Token grid: models fed (B, C, H, W) latents give (H // p, W // p) with p = ``config.patch_size``. Packed
models (Flux, Flux2, Chroma: (B, N, C) tokens) read it from ``img_ids`` (column 1 = row, column 2 =
column; one device-to-host copy of two numbers per step); a HiDream forward fed packed tokens reads it from
``img_sizes``. Without those ids a square N is a square grid, anything else asks for ``grid=(H, W)``.
``capture.grid = (H, W)`` overrides the derivation (and saves that copy); set smaller than the packed
sequence (Flux Kontext appends reference-image tokens after the target), it selects the first H·W tokens.

Gradient checkpointing: only the first call of the hooked block in each model forward is kept, so the
recomputation that non-reentrant checkpointing (diffusers' default) runs during backward never replaces it.
Reentrant checkpointing runs the block under ``no_grad``, where the captured tensor would carry no graph:
that is detected and raised. ``torch.compile`` (of the whole model, before or after attaching, or of each
block) traces the hooks; popping happens outside the compiled region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

Grid = tuple[int, int]


@dataclass(frozen=True)
class _Family:
    blocks: tuple[str, ...]     # ModuleList attributes, in forward order
    image_in_tuple: int = 1     # which element of a tuple output is the image stream
    joint: str = "none"         # how a joint text+image tensor is laid out: text_first | image_first | caption_mask


_FLUX = _Family(("transformer_blocks", "single_transformer_blocks"), joint="text_first")
DIT_FAMILIES: dict[str, _Family] = {
    "FluxTransformer2DModel": _FLUX,
    "Flux2Transformer2DModel": _FLUX,
    "ChromaTransformer2DModel": _FLUX,
    "AuraFlowTransformer2DModel": _Family(("joint_transformer_blocks", "single_transformer_blocks"),
                                          joint="text_first"),
    "SD3Transformer2DModel": _Family(("transformer_blocks",)),
    "HiDreamImageTransformer2DModel": _Family(("double_stream_blocks", "single_stream_blocks"),
                                              image_in_tuple=0, joint="image_first"),
    "Lumina2Transformer2DModel": _Family(("layers",), joint="caption_mask"),
    "SanaTransformer2DModel": _Family(("transformer_blocks",)),
    "PixArtTransformer2DModel": _Family(("transformer_blocks",)),
    "DiTTransformer2DModel": _Family(("transformer_blocks",)),
}
UNET_FAMILIES = ("UNet2DConditionModel",)
KINDS = ("dit", "unet")


class BlockIndexError(IndexError, ValueError):
    """A block index outside [0, num_blocks): both an IndexError and a ValueError."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself under torch.compile's OptimizedModule and (Distributed)DataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def _family_name(model: torch.nn.Module) -> Optional[str]:
    # Matched by class name along the MRO: subclasses (FSDP2's dynamic ones included) resolve to their
    # diffusers base, and this module needs no diffusers import.
    for cls in type(model).__mro__:
        if cls.__name__ in DIT_FAMILIES or cls.__name__ in UNET_FAMILIES:
            return cls.__name__
    return None


def model_kind(model: torch.nn.Module) -> str:
    """``"unet"`` for the UNet2DConditionModel family, ``"dit"`` for a supported transformer; else ValueError."""
    name = _family_name(_unwrap(model))
    if name is None:
        supported = ", ".join(list(DIT_FAMILIES) + list(UNET_FAMILIES))
        raise ValueError(f"unsupported model class {type(_unwrap(model)).__name__}; supported: {supported}")
    return "unet" if name in UNET_FAMILIES else "dit"


def _blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    family = DIT_FAMILIES[_family_name(model)]
    return [(f"{attr}.{i}", block) for attr in family.blocks for i, block in enumerate(getattr(model, attr))]


def num_blocks(model: torch.nn.Module) -> int:
    """Hookable transformer blocks of a DiT; REPA's block index lies in [0, num_blocks(model))."""
    model = _unwrap(model)
    if model_kind(model) != "dit":
        raise ValueError(f"{type(model).__name__} is a UNet: U-REPA captures its mid_block, it has no block index")
    return len(_blocks(model))


def _hidden_width(model: torch.nn.Module, kind: str) -> int:
    config = model.config
    if kind == "unet":
        return int(config.block_out_channels[-1])
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    return int(config.num_attention_heads * config.attention_head_dim)


def _check_grid(grid) -> Grid:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    return int(grid[0]), int(grid[1])


class Capture:
    """Holds the hidden state of one hooked module between the model forward and the loss.

    Attributes: ``kind`` ("dit" | "unet"), ``block_index``, ``block_name`` (e.g.
    ``"single_transformer_blocks.3"`` or ``"mid_block"``), ``hidden_width`` (C), ``grid`` (None: derived per
    forward; set it to an (H, W) to override, e.g. for packed latents without ``img_ids``).
    """

    def __init__(self, model: torch.nn.Module, kind: str, block_index: Optional[int], module: torch.nn.Module,
                 block_name: str, grid: Optional[Grid]):
        self.model = model
        self.kind = kind
        self.block_index = block_index
        self.block_name = block_name
        self.hidden_width = _hidden_width(model, kind)
        self.grid = grid
        name = _family_name(model)
        self._family = DIT_FAMILIES.get(name, _Family(()))
        self._patch = int(getattr(model.config, "patch_size", None) or 1)
        self._armed = False      # True from the model's forward pre-hook until the block's first call
        self._grad = False       # grad mode of that model forward
        self._inputs: dict = {}  # the model forward's arguments the grid and the image span depend on
        self._raw: Optional[torch.Tensor] = None
        self._raw_grad = False   # whether _raw came from a grad-enabled forward (it carries a graph)
        self._handles = [
            model.register_forward_pre_hook(self._on_model_call, with_kwargs=True),
            module.register_forward_hook(self._on_block_output),
        ]

    # -- hooks (traced by torch.compile: keep them to attribute stores) --------------------------------------

    def _on_model_call(self, module, args, kwargs):
        latent = kwargs.get("sample" if self.kind == "unet" else "hidden_states", args[0] if args else None)
        self._inputs = {
            "latent_shape": None if latent is None else tuple(latent.shape),
            "img_ids": kwargs.get("img_ids"),
            "img_sizes": kwargs.get("img_sizes"),
            "encoder_attention_mask": kwargs.get("encoder_attention_mask"),
        }
        self._armed = True
        self._grad = torch.is_grad_enabled()

    def _on_block_output(self, module, args, output):
        if not self._armed:
            return  # a checkpoint recomputation during backward, or a call outside the model's forward
        if self._grad and not torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.block_name} ran under no_grad inside a grad-enabled forward: reentrant gradient "
                "checkpointing (use_reentrant=True) hides the block's graph from the capture hook. Use "
                "non-reentrant checkpointing (diffusers' default, torch.utils.checkpoint(..., use_reentrant=False)).")
        self._armed = False
        if self._raw_grad and not self._grad:
            # A no_grad forward (a validation pass, a teacher or prior forward of the same model) between the
            # training forward and the loss: keeping the training capture keeps the regularizer's gradient.
            return
        self._raw = output[self._family.image_in_tuple] if isinstance(output, (tuple, list)) else output
        self._raw_grad = self._grad

    # -- public -------------------------------------------------------------------------------------------

    @property
    def grid(self) -> Optional[Grid]:
        """(H, W) of the image tokens when set by the user; None derives it from each forward's inputs."""
        return self._grid

    @grid.setter
    def grid(self, value) -> None:
        self._grid = None if value is None else _check_grid(value)

    @property
    def captured(self) -> bool:
        """Whether a forward has stored a hidden state that was not popped yet."""
        return self._raw is not None

    def clear(self) -> None:
        """Drop the stored hidden state (and its graph) without using it."""
        self._raw, self._raw_grad = None, False

    def pop(self) -> tuple[torch.Tensor, Grid]:
        """(tokens (B, N, C), grid (H, W)) of the last forward's image stream; the store is emptied.

        Every forward stores (the latest wins), ``no_grad`` ones too (their tokens carry no graph, which
        suits validation metrics), except that a ``no_grad`` forward never replaces a capture from a
        grad-enabled one that was not popped yet: the training forward's tokens are what the loss needs.
        Pop once per training forward, after it and before ``backward``.
        """
        raw, self._raw, self._raw_grad = self._raw, None, False
        if raw is None:
            raise RuntimeError(
                f"nothing captured at {self.block_name}: run the model forward (with this capture attached) "
                "before computing the loss, pop once per forward, and make sure the block is not skipped "
                "(e.g. SD3's skip_layers)")
        if raw.dim() == 4:  # (B, C, H, W): a UNet mid block, or a DiT block with a spatial layout
            grid = self.grid or (raw.shape[2], raw.shape[3])
            return raw.flatten(2).transpose(1, 2), grid
        if raw.dim() != 3:
            raise RuntimeError(f"{self.block_name} returned a {raw.dim()}-D tensor {tuple(raw.shape)}; "
                               "expected (B, N, C) tokens or a (B, C, H, W) map")
        grid = self.grid or self._derive_grid()
        return self._image_span(raw, grid[0] * grid[1]), grid

    def remove(self) -> None:
        """Detach the hooks and drop any stored tensor."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()
        self._inputs = {}

    def __repr__(self) -> str:
        return (f"Capture(kind={self.kind!r}, block={self.block_name!r}, hidden_width={self.hidden_width}, "
                f"model={type(self.model).__name__})")

    # -- grid and image span ------------------------------------------------------------------------------

    def _derive_grid(self) -> Grid:
        shape = self._inputs.get("latent_shape")
        if shape is not None and len(shape) == 4:
            return shape[2] // self._patch, shape[3] // self._patch
        sizes = self._inputs.get("img_sizes")
        if sizes is not None:
            sizes = torch.as_tensor(sizes).reshape(-1, 2)
            if not bool((sizes == sizes[0]).all()):
                raise ValueError(f"img_sizes differ across the batch ({sizes.tolist()}); one grid is needed")
            return int(sizes[0, 0]), int(sizes[0, 1])
        n = shape[1] if shape is not None else None
        ids = self._inputs.get("img_ids")
        if ids is not None and n is not None:
            ids = ids.reshape(-1, ids.shape[-1])[-n:, 1:3]
            span = (ids.amax(0) - ids.amin(0) + 1).tolist()
            grid = int(span[0]), int(span[1])
            if grid[0] * grid[1] != n:
                raise ValueError(f"img_ids span a {grid[0]}×{grid[1]} grid but the model received {n} image tokens "
                                 "(reference-image tokens?): set capture.grid = (H, W) of the target image")
            return grid
        if n is not None and math.isqrt(n) ** 2 == n:
            return math.isqrt(n), math.isqrt(n)
        raise ValueError(f"cannot tell the token grid of {n} packed tokens without img_ids: pass grid=(H, W) to "
                         "attach_capture or set capture.grid")

    def _image_tokens_in(self) -> int:
        """Image tokens the model forward received (0 when unknown)."""
        shape = self._inputs.get("latent_shape")
        if shape is None:
            return 0
        if len(shape) == 4:
            return (shape[2] // self._patch) * (shape[3] // self._patch)
        return shape[1]

    def _image_span(self, raw: torch.Tensor, n: int) -> torch.Tensor:
        """The n image tokens of a block output that may also hold text tokens (see the module table)."""
        total = raw.shape[1]
        joint = self._family.joint
        if total == n:
            return raw
        if total < n:
            raise ValueError(f"{self.block_name} output has {total} tokens, fewer than the grid's {n}: pass the "
                             "right grid=(H, W)")
        if joint == "text_first":
            # The model's image tokens close the sequence; a grid set smaller than them (Flux Kontext appends
            # reference-image tokens after the target) selects the first H·W of them.
            start = total - max(self._image_tokens_in(), n)
            return raw[:, start:start + n]
        if joint == "image_first":
            return raw[:, :n]
        if joint == "caption_mask":
            mask = self._inputs.get("encoder_attention_mask")
            if mask is None:
                raise ValueError("Lumina2 capture needs the forward's encoder_attention_mask to find image tokens")
            start = mask.to(torch.long).sum(1)  # image tokens follow each sample's valid caption tokens
            index = (start[:, None] + torch.arange(n, device=raw.device)).to(raw.device)
            return raw.gather(1, index[..., None].expand(-1, -1, raw.shape[2]))
        raise ValueError(f"{self.block_name} output has {total} tokens, not the grid's {n}: pass grid=(H, W)")


def attach_capture(model: torch.nn.Module, kind: str, block_index: Optional[int] = None, *,
                   grid: Optional[Grid] = None) -> Capture:
    """Hook ``model`` so that each forward stores the hidden state REPA or U-REPA aligns.

    ``kind="dit"``: transformer block ``block_index`` in [0, num_blocks(model)) (see the module table for
    the numbering); ``kind="unet"``: ``model.mid_block``, ``block_index`` must be None. Errors (raised here,
    at attach time): an unsupported model, the wrong kind for the model, a missing or out-of-range index.
    ``grid``: (H, W) of the image tokens, to override the grid derived from each forward's inputs.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model = _unwrap(model)
    actual = model_kind(model)
    cls = type(model).__name__
    if kind == "dit" and actual == "unet":
        raise ValueError(f"REPA (kind='dit') taps a transformer block, but {cls} is a UNet: use U-REPA "
                         "(kind='unet', urepa_* keys), which taps its mid_block")
    if kind == "unet" and actual == "dit":
        raise ValueError(f"U-REPA (kind='unet') taps a UNet mid_block, but {cls} is a diffusion transformer: "
                         "use REPA (kind='dit', crepa_* keys) with a block index")
    if kind == "unet":
        if block_index is not None:
            raise ValueError(f"U-REPA captures {cls}.mid_block; block_index must be None, got {block_index!r}")
        if getattr(model, "mid_block", None) is None:
            raise ValueError(f"{cls} has no mid_block (mid_block_type=None?): U-REPA has nothing to capture")
        return Capture(model, kind, None, model.mid_block, "mid_block", grid)
    if block_index is None:
        raise ValueError(f"REPA on {cls} needs a block index (crepa_block_index) in [0, {num_blocks(model)})")
    if not isinstance(block_index, int) or isinstance(block_index, bool):
        raise TypeError(f"block_index must be an int, got {type(block_index).__name__}")
    blocks = _blocks(model)
    if not 0 <= block_index < len(blocks):
        layout = " + ".join(f"{len(getattr(model, a))} {a}" for a in DIT_FAMILIES[_family_name(model)].blocks)
        raise BlockIndexError(f"block_index {block_index} is out of range for {cls}: valid range is "
                              f"[0, {len(blocks)}) ({layout}, numbered in that order)")
    name, block = blocks[block_index]
    return Capture(model, kind, block_index, block, name, grid)
