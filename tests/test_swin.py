"""The Swin encoders (swin_unetr, voco, suprem) attend through PyTorch's fused attention without
gradients (features, evaluation), and that is the function their training path computes."""
import pytest
import torch
from monai.networks.nets.swin_unetr import WindowAttention

from bench.config import compose
from bench.registry import create_method, get_method


@pytest.mark.parametrize("name", ["swin_unetr", "voco", "suprem"])
def test_features_without_gradients_take_the_fused_attention_and_equal_the_training_path(name):
    torch.manual_seed(0)
    cfg = compose({"method": name, "preset": "tiny"}, get_method(name))
    encoder = create_method(name, cfg).build_model(num_classes=2).eval().encoder
    attention = [m for m in encoder.modules() if isinstance(m, WindowAttention)]
    assert attention and all(m.use_flash_attention for m in attention)
    x = torch.rand(2, 1, cfg.crop_size, cfg.crop_size, cfg.crop_size)
    with torch.no_grad():
        fused = encoder(x)
    with torch.enable_grad():
        unfused = encoder(x).detach()
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
