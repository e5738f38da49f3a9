"""SPECTRE: the released backbone file (the VisionTransformer's flat state dict) and the DINOv2
training checkpoint (`save_state`: the model under `model`, the teacher as `backbone_teacher.vit.*`,
numpy RNG states beside it) load all 390 tensors of the ViT-L; the file's keys and shapes are listed
here from SPECTRE's `vision_transformer.py`, `layers/attention.py` and `layers/rotary_pos_embed.py`,
not taken from this encoder."""
import json
import random

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from tests_helpers import assert_encoder_loaded, encoder_init, run_cli, setup_public

DIM, DEPTH, HEADS = 1080, 24, 12


def _released_state() -> dict[str, torch.Tensor]:
    """vit_large_patch16_128(num_classes=0, global_pool='', pos_embed='rope', rope_kwargs={'base': 1000.0},
    init_values=1.0): no pos_embed, a persistent `rope.periods` buffer of head_dim // 6 = 15."""
    g = torch.Generator().manual_seed(0)
    shapes = {"cls_token": (1, 1, DIM), "patch_embed.proj.weight": (DIM, 1, 16, 16, 8), "patch_embed.proj.bias": (DIM,),
              "norm.weight": (DIM,), "norm.bias": (DIM,)}
    block = {"norm1.weight": (DIM,), "norm1.bias": (DIM,), "attn.q.weight": (DIM, DIM), "attn.q.bias": (DIM,),
             "attn.kv.weight": (2 * DIM, DIM), "attn.kv.bias": (2 * DIM,), "attn.proj.weight": (DIM, DIM),
             "attn.proj.bias": (DIM,), "ls1.gamma": (DIM,), "norm2.weight": (DIM,), "norm2.bias": (DIM,),
             "mlp.fc1.weight": (4 * DIM, DIM), "mlp.fc1.bias": (4 * DIM,), "mlp.fc2.weight": (DIM, 4 * DIM),
             "mlp.fc2.bias": (DIM,), "ls2.gamma": (DIM,)}
    shapes.update({f"blocks.{i}.{k}": s for i in range(DEPTH) for k, s in block.items()})
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    head_dim = DIM // HEADS
    state["rope.periods"] = 1000.0 ** (2 * torch.arange(head_dim // 6, dtype=torch.float32) / (head_dim // 3))
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[dict[str, torch.Tensor], object]:
    """The released state and its file, written once: the ViT-L is 338M parameters."""
    known = _released_state()
    path = tmp_path_factory.mktemp("spectre") / "spectre_backbone_vit_large_patch16_128.pt"
    torch.save(known, path)
    return known, path


def test_released_backbone_file_loads_all_390_tensors(released):
    known, path = released
    method, cfg, model = setup_public("spectre", path, preset="paper")
    report = encoder_init(method, cfg, model)["load_report"]
    assert report["matched"] == len(known) == 390 and not report["missing"] and not report["shape_mismatched"]
    assert_encoder_loaded(method, model, known)


def test_dinov2_training_checkpoint_loads_the_teacher(released, tmp_path):
    teacher = released[0]
    student = {k: v + 1.0 for k, v in teacher.items()}
    model_state = {**{f"backbone_teacher.vit.{k}": v for k, v in teacher.items()},
                   **{f"backbone_student.vit.{k}": v for k, v in student.items()},
                   "backbone_student.mask_token": torch.zeros(1, 1, DIM),
                   "head_student.dino_head.last_layer.weight": torch.randn(64, 256)}
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(), "cuda": None}
    path = tmp_path / "checkpoint_epoch=0100.pt"
    torch.save({"epoch": 100, "rng_states": [rng], "model": model_state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.004, "params": [0]}]}}, path)
    method, cfg, model = setup_public("spectre", path, preset="paper")
    encoder_init(method, cfg, model)
    assert_encoder_loaded(method, model, teacher)


def test_an_encoder_without_layer_scale_fails_naming_the_gammas(released):
    method, cfg, model = setup_public("spectre", released[1], preset="paper", **{"model.init_values": "0"})
    with pytest.raises(BenchError, match=r"blocks\.0\.ls1\.gamma"):
        encoder_init(method, cfg, model)


def test_rotary_attention_scores_depend_on_the_offset_alone():
    """RoPE's defining property on a 3D grid: q . k after rotation is the same for every pair of
    tokens at the same (dh, dw, dd) offset; the rotation keeps norms."""
    from bench.methods.spectre import AxialRoPE3D, rotate

    rope = AxialRoPE3D(head_dim=12, base=100.0)
    grid = (4, 4, 4)
    sin, cos = rope(grid)
    q, k = torch.randn(12), torch.randn(12)
    qs, ks = rotate(q.expand(64, 12), sin, cos), rotate(k.expand(64, 12), sin, cos)
    index = lambda h, w, d: (h * 4 + w) * 4 + d  # noqa: E731
    torch.testing.assert_close(qs[index(0, 1, 2)] @ ks[index(1, 1, 3)], qs[index(2, 0, 0)] @ ks[index(3, 0, 1)])
    torch.testing.assert_close(qs.norm(dim=1), q.norm().expand(64))


def test_input_is_halved_in_depth_and_features_are_cls_beside_the_patch_mean():
    from bench.methods.spectre import SpectreEncoder, SpectreParams

    p = SpectreParams(patch_size=[8, 8, 4], embed_dim=24, depth=1, num_heads=2)
    encoder = SpectreEncoder(p)
    seen = {}
    encoder.vit.patch_embed.proj.register_forward_hook(lambda m, i, o: seen.update(grid=o.shape[2:]))
    assert encoder(torch.rand(2, 1, 32, 32, 32)).shape == (2, 48)
    assert tuple(seen["grid"]) == (4, 4, 4)  # 32 x 32 x 16 voxels in patches of 8 x 8 x 4


def test_dinov2_pretext_learns_and_the_teacher_follows():
    from bench.config import compose
    from bench.registry import create_method, get_method

    torch.manual_seed(0)
    cfg = compose({"method": "spectre", "preset": "tiny", "regime": "public_to_vertebrae"}, get_method("spectre"))
    method = create_method("spectre", cfg)
    pretext = method.build_pretext("vertebrae")
    optimiser = torch.optim.AdamW([p for p in pretext.parameters() if p.requires_grad], lr=1e-3)
    before = pretext.teacher["vit"].cls_token.clone()
    x = torch.rand(4, 1, 32, 32, 32)
    losses = []
    for step in range(1, 9):
        torch.manual_seed(1)
        out = pretext(x)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        pretext.on_step(step, 8)
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] and {"dino", "ibot"} <= set(out)
    assert not torch.equal(pretext.teacher["vit"].cls_token, before)
    assert all(p.grad is None for p in pretext.teacher.parameters())


@pytest.mark.e2e
def test_public_to_vertebrae_through_the_cli(tmp_path):
    out = run_cli("run", "method=spectre", "regime=public_to_vertebrae", "preset=tiny", "epochs=1", "pretrain.epochs=1",
                  f"out={tmp_path}/runs")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(next((tmp_path / "runs" / "single").glob("*/metrics.json")).read_text())
    assert metrics["pretraining"]["plan"] == ["public", "vertebrae"]


def test_sinkhorn_knopp_targets_share_the_prototypes_out_evenly():
    """DINOv2's teacher normalisation: each target a distribution, every prototype's share of the batch
    equal; identical inputs give the uniform target that plain centring would also give."""
    from bench.methods.spectre import sinkhorn_knopp

    scores = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 5
    q = sinkhorn_knopp(scores, iterations=50)
    torch.testing.assert_close(q.sum(1), torch.ones(32))
    torch.testing.assert_close(q.sum(0), torch.full((8,), 32 / 8), rtol=1e-3, atol=1e-3)
    assert torch.allclose(sinkhorn_knopp(torch.ones(4, 8)), torch.full((4, 8), 1 / 8))
