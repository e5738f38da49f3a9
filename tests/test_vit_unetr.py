"""ViT UNETR SSL: the contrastive term is the tutorial's MONAI NT-Xent, computed without its
(2B, 2B, D) broadcast."""
import torch
from monai.losses import ContrastiveLoss

from bench.config import compose
from bench.registry import create_method, get_method


def test_contrastive_term_equals_monai_contrastive_loss():
    cfg = compose({"method": "vit_unetr", "preset": "tiny"}, get_method("vit_unetr"))
    pretext = create_method("vit_unetr", cfg).build_pretext()
    g = torch.Generator().manual_seed(0)
    out1 = torch.rand(6, 1, 8, 8, 8, generator=g, dtype=torch.float64)
    out2 = out1 + 0.3 * torch.rand(6, 1, 8, 8, 8, generator=g, dtype=torch.float64)
    ours = pretext.contrast(out1, out2)
    monai = ContrastiveLoss(temperature=cfg.model.temperature)(out1.flatten(1), out2.flatten(1))
    torch.testing.assert_close(ours.double(), monai.double(), rtol=1e-5, atol=1e-6)
    assert ours.item() > 0.0


def test_corrupted_views_reach_the_encoder_as_plain_tensors():
    """MONAI's transforms hand out MetaTensors, which a torch.compile'd graph cannot take."""
    cfg = compose({"method": "vit_unetr", "preset": "tiny"}, get_method("vit_unetr"))
    pretext = create_method("vit_unetr", cfg).build_pretext()
    seen = []
    pretext.encoder.register_forward_pre_hook(lambda module, args: seen.append(type(args[0])))
    out = pretext(torch.rand(2, 1, 32, 32, 32))
    assert seen == [torch.Tensor, torch.Tensor] and torch.isfinite(out["loss"])
