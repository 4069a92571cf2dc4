"""Capture hooks on tiny random diffusers models of every supported family (CPU, a few seconds each)."""

from __future__ import annotations

import functools

import pytest
import torch
from models import TINY_DIT, TINY_UNET, _packed_ids

from repa_fused.training.capture import BlockIndexError, attach_capture, model_kind, num_blocks

pytest.importorskip("diffusers")

DIT = sorted(TINY_DIT)
UNET = sorted(TINY_UNET)


@functools.lru_cache(maxsize=None)
def tiny(name):
    return (TINY_DIT.get(name) or TINY_UNET[name])()


def _block(model, dotted):
    attr, index = dotted.split(".")
    return getattr(model, attr)[int(index)]


def expected_image_tokens(name, model, raw, inputs, n):
    """The image stream of a block's raw output, written from each family's forward, independently of capture.py:
    text lengths are counted from the inputs (prefix offsets), where capture.py slices from the end."""
    if isinstance(raw, tuple):
        raw = raw[0] if name == "hidream" else raw[1]
    total = raw.shape[1]
    if total == n:
        return raw
    if name in ("flux", "flux2", "chroma"):
        return raw[:, inputs["encoder_hidden_states"].shape[1]:]
    if name == "auraflow":  # learned register tokens precede the caption
        return raw[:, model.register_tokens.shape[1] + inputs["encoder_hidden_states"].shape[1]:]
    if name == "hidream":  # image tokens first, then (for non-square latents) padding to max_seq, then text
        return raw[:, :n]
    if name == "lumina2":  # [caption (valid part), image, padding] per sample
        caption = inputs["encoder_attention_mask"].sum(1).tolist()
        return torch.stack([raw[i, c:c + n] for i, c in enumerate(caption)])
    raise AssertionError(f"{name}: unexpected {total} tokens for {n} image tokens")


@pytest.mark.parametrize("name", DIT)
def test_dit_capture_is_the_block_image_stream(name):
    t = tiny(name)
    assert model_kind(t.model) == "dit" and num_blocks(t.model) == t.num_blocks
    inputs = t.inputs(batch=2)
    seen = []
    for k in range(t.num_blocks):
        cap = attach_capture(t.model, "dit", k)
        raws = []
        probe = _block(t.model, cap.block_name).register_forward_hook(lambda m, a, out: raws.append(out))
        try:
            t.model(**inputs)
            tokens, grid = cap.pop()
        finally:
            probe.remove()
            cap.remove()
        n = t.grid[0] * t.grid[1]
        assert grid == t.grid
        assert tokens.shape == (2, n, t.hidden_width) and cap.hidden_width == t.hidden_width
        assert tokens.requires_grad
        assert len(raws) == 1
        torch.testing.assert_close(tokens, expected_image_tokens(name, t.model, raws[0], inputs, n), rtol=0, atol=0)
        assert all(not torch.equal(tokens, s) for s in seen), "two block indices captured the same tensor"
        seen.append(tokens.detach())


# The model itself strips the text after its last block and feeds the image tokens to its output layer:
# the capture of the last block must be exactly that tensor.
OUTPUT_LAYER = {"flux": "norm_out", "flux2": "norm_out", "chroma": "norm_out", "auraflow": "norm_out",
                "sd3": "norm_out", "hidream": "final_layer", "sana": "norm_out"}


@pytest.mark.parametrize("name", sorted(OUTPUT_LAYER))
def test_last_block_capture_equals_the_models_own_image_tokens(name):
    t = tiny(name)
    cap = attach_capture(t.model, "dit", t.num_blocks - 1)
    fed = []
    probe = getattr(t.model, OUTPUT_LAYER[name]).register_forward_pre_hook(lambda m, args: fed.append(args[0]))
    try:
        t.model(**t.inputs(batch=2))
        tokens, _ = cap.pop()
    finally:
        probe.remove()
        cap.remove()
    n = t.grid[0] * t.grid[1]
    torch.testing.assert_close(tokens, fed[0][:, :n], rtol=0, atol=0)


@pytest.mark.parametrize("name", UNET)
def test_unet_mid_block_capture(name):
    t = tiny(name)
    assert model_kind(t.model) == "unet"
    cap = attach_capture(t.model, "unet")
    raws = []
    probe = t.model.mid_block.register_forward_hook(lambda m, a, out: raws.append(out))
    try:
        t.model(**t.inputs(batch=2))
        tokens, grid = cap.pop()
    finally:
        probe.remove()
        cap.remove()
    assert cap.hidden_width == t.model.config.block_out_channels[-1] == tokens.shape[-1]
    assert grid == t.grid == tuple(raws[0].shape[2:])
    b, c, h, w = raws[0].shape
    # Token n of the row-major grid is pixel (n // W, n % W) of the (B, C, H, W) map.
    for n in (0, 1, w, h * w - 1):
        torch.testing.assert_close(tokens[:, n], raws[0][:, :, n // w, n % w], rtol=0, atol=0)


def test_unet_grid_follows_the_latent():
    t = tiny("sd15")
    cap = attach_capture(t.model, "unet")
    try:
        t.model(**t.inputs(batch=1, size=(16, 8)))
        tokens, grid = cap.pop()
    finally:
        cap.remove()
    assert grid == (8, 4) and tokens.shape == (1, 32, cap.hidden_width)


@pytest.mark.parametrize("name", DIT)
def test_block_index_errors(name):
    t = tiny(name)
    n = t.num_blocks
    for bad in (-1, n, n + 5):
        with pytest.raises(BlockIndexError, match=rf"valid range is \[0, {n}\)"):
            attach_capture(t.model, "dit", bad)
    with pytest.raises(IndexError):
        attach_capture(t.model, "dit", n)
    with pytest.raises(ValueError, match="needs a block index"):
        attach_capture(t.model, "dit", None)
    with pytest.raises(TypeError, match="int"):
        attach_capture(t.model, "dit", 1.0)
    assert not t.model._forward_hooks and not t.model._forward_pre_hooks  # nothing left behind


def test_wrong_family_errors():
    dit, unet = tiny("flux"), tiny("sd15")
    with pytest.raises(ValueError, match="is a UNet: use U-REPA"):
        attach_capture(unet.model, "dit", 0)
    with pytest.raises(ValueError, match="diffusion transformer: use REPA"):
        attach_capture(dit.model, "unet")
    with pytest.raises(ValueError, match="block_index must be None"):
        attach_capture(unet.model, "unet", 3)
    with pytest.raises(ValueError, match="kind must be one of"):
        attach_capture(dit.model, "transformer", 0)
    with pytest.raises(ValueError, match="no block index"):
        num_blocks(unet.model)
    with pytest.raises(ValueError, match=r"unsupported model class Linear; supported: .*FluxTransformer2DModel"):
        model_kind(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unsupported model class"):
        attach_capture(torch.nn.Linear(2, 2), "dit", 0)


def test_wrappers_are_unwrapped():
    t = tiny("sd3")
    wrapped = torch.nn.DataParallel(torch.compile(t.model, backend="eager"))
    assert model_kind(wrapped) == "dit" and num_blocks(wrapped) == t.num_blocks
    cap = attach_capture(wrapped, "dit", 0)
    assert cap.model is t.model
    cap.remove()


def test_pop_errors_and_lifecycle():
    t = tiny("pixart")
    cap = attach_capture(t.model, "dit", 1)
    try:
        with pytest.raises(RuntimeError, match="run the model forward"):
            cap.pop()
        t.model(**t.inputs(batch=1))
        assert cap.captured
        cap.pop()
        assert not cap.captured
        with pytest.raises(RuntimeError, match="nothing captured"):
            cap.pop()
        t.model(**t.inputs(batch=1))
        cap.clear()
        assert not cap.captured
        with torch.no_grad():  # evaluation forwards are captured too, without a graph
            t.model(**t.inputs(batch=1))
        tokens, _ = cap.pop()
        assert not tokens.requires_grad
    finally:
        cap.remove()
    t.model(**t.inputs(batch=1))
    assert not cap.captured and not t.model._forward_pre_hooks
    assert not t.model.transformer_blocks[1]._forward_hooks


def test_no_grad_forward_never_replaces_a_pending_grad_capture():
    t = tiny("pixart")
    cap = attach_capture(t.model, "dit", 1)
    try:
        t.model(**t.inputs(batch=1, seed=0))  # the training forward
        with torch.no_grad():  # e.g. a validation or teacher forward of the same model before the loss
            t.model(**t.inputs(batch=2, seed=1))
        tokens, _ = cap.pop()
        assert tokens.requires_grad and tokens.shape[0] == 1  # the training capture survived
        with torch.no_grad():
            t.model(**t.inputs(batch=2, seed=1))
        t.model(**t.inputs(batch=1, seed=0))  # a grad forward does replace a no_grad capture
        tokens, _ = cap.pop()
        assert tokens.requires_grad and tokens.shape[0] == 1
    finally:
        cap.remove()


def test_packed_grid_from_img_ids_and_override():
    t = tiny("flux")
    cap = attach_capture(t.model, "dit", 3)  # a single-stream block: text must be stripped
    try:
        inputs = t.inputs(batch=2)
        inputs["img_ids"] = _packed_ids(4, 3, 3)  # same 12 tokens, transposed grid
        t.model(**inputs)
        assert cap.pop()[1] == (4, 3)

        # Kontext-style: reference-image tokens appended after the target, ids of a second "time" plane.
        ref_ids = _packed_ids(3, 4, 3)
        ref_ids[:, 0] = 1
        inputs = t.inputs(batch=2)
        target = inputs["hidden_states"]
        inputs["hidden_states"] = torch.cat([target, torch.randn_like(target)], 1)
        inputs["img_ids"] = torch.cat([inputs["img_ids"], ref_ids])
        t.model(**inputs)
        with pytest.raises(ValueError, match=r"capture.grid = \(H, W\)"):
            cap.pop()
        cap.grid = (3, 4)
        raws = []
        probe = t.model.single_transformer_blocks[1].register_forward_hook(lambda m, a, out: raws.append(out))
        t.model(**inputs)
        probe.remove()
        tokens, grid = cap.pop()
        assert grid == (3, 4)
        torch.testing.assert_close(tokens, raws[0][1][:, :12], rtol=0, atol=0)  # the target, not the reference
        with pytest.raises(ValueError, match="pair of positive ints"):
            cap.grid = (3, 0)
    finally:
        cap.remove()


def test_hidream_packed_input_grid_from_img_sizes():
    t = tiny("hidream")
    inputs = t.inputs(batch=2)
    cap = attach_capture(t.model, "dit", 3)
    try:
        t.model(**inputs)
        want, want_grid = cap.pop()
        # The same forward fed pre-patchified tokens, padded to max_seq (non-square), with their sizes.
        packed, masks, sizes, ids = t.model.patchify(inputs["hidden_states"])
        assert masks is not None and packed.shape[1] > 12
        inputs.update(hidden_states=packed, hidden_states_masks=masks, img_sizes=sizes, img_ids=ids)
        t.model(**inputs)
        tokens, grid = cap.pop()
    finally:
        cap.remove()
    assert grid == want_grid == t.grid
    torch.testing.assert_close(tokens, want)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", DIT + UNET)
def test_gradient_checkpointing_keeps_the_first_capture(name):
    t = tiny(name)
    kind = model_kind(t.model)
    block = None if kind == "unet" else t.num_blocks // 2
    inputs = t.inputs(batch=2)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            t.model.enable_gradient_checkpointing()
        cap = attach_capture(t.model, kind, block)
        module = t.model.mid_block if kind == "unet" else _block(t.model, cap.block_name)
        calls = []
        probe = module.register_forward_hook(lambda m, a, out: calls.append(1))
        try:
            t.model.zero_grad(set_to_none=True)
            # Without early stop the recomputation runs each checkpointed block to its end, so its forward
            # hook fires again during backward: the case the capture must ignore.
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                out = t.model(**inputs)[0]
                tokens, _ = cap.pop()
                (out.square().mean() + tokens.square().mean()).backward()
            assert not cap.captured, "the recomputation during backward stored a tensor"
            results.append((tokens.detach(), _grads(t.model), len(calls)))
        finally:
            probe.remove()
            cap.remove()
            t.model.disable_gradient_checkpointing()
    (plain, g_plain, calls_plain), (ckpt, g_ckpt, calls_ckpt) = results
    if kind == "dit":
        assert calls_plain == 1 and calls_ckpt == 2  # the block really was recomputed
    torch.testing.assert_close(ckpt, plain)
    assert g_plain.keys() == g_ckpt.keys()
    for key in g_plain:
        torch.testing.assert_close(g_ckpt[key], g_plain[key], rtol=1e-4, atol=1e-6)


def test_reentrant_checkpointing_is_an_error():
    t = tiny("sd3")
    t.model.enable_gradient_checkpointing(
        functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    cap = attach_capture(t.model, "dit", 1)
    inputs = t.inputs(batch=1)
    inputs["hidden_states"].requires_grad_(True)
    try:
        with pytest.raises(RuntimeError, match="use_reentrant=False"):
            t.model(**inputs)
    finally:
        cap.remove()
        t.model.disable_gradient_checkpointing()


def test_torch_compile_traces_the_hooks():
    t = tiny("sd3")
    inputs = t.inputs(batch=2)
    eager = attach_capture(t.model, "dit", 1)
    t.model(**inputs)
    want, _ = eager.pop()
    eager.remove()

    before = attach_capture(t.model, "dit", 1)                   # attached, then compiled
    compiled = torch.compile(t.model, backend="aot_eager", fullgraph=True)
    after = attach_capture(compiled, "dit", 2)                   # attached to the compiled module
    try:
        for step in range(2):
            t.model.zero_grad(set_to_none=True)
            compiled(**inputs)
            tokens, grid = before.pop()
            other, _ = after.pop()
            assert grid == t.grid and other.shape == tokens.shape
            torch.testing.assert_close(tokens, want)
            tokens.square().mean().backward()
            assert t.model.transformer_blocks[0].attn.to_q.weight.grad is not None
    finally:
        before.remove()
        after.remove()
        torch._dynamo.reset()
