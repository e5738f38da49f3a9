"""Merlin: the released file (the whole MerlinArchitecture, the encoder under
`encode_image.i3_resnet.`) and the five-year file (the i3_resnet's own keys) load every encoder tensor
of the I3D ResNet-152 by value; the file is built from torchvision's ResNet-152 inflated as Merlin's
`inflate.py` does, so names and shapes come from the published network, not from this encoder."""
import json

import pytest
import torch

from bench.errors import BenchError
from tests_helpers import assert_encoder_loaded, encoder_init, randomised, run_cli, setup_public


def _inflated_resnet152() -> dict[str, torch.Tensor]:
    """torchvision's ResNet-152 without `fc`, every 2D kernel inflated as Merlin's inflate_conv: the 7x7
    stem and the 3x3 convolutions get a time extent of 3, the 1x1 convolutions of 1."""
    from torchvision.models import resnet152

    out = {}
    for key, value in resnet152(weights=None).state_dict().items():
        if key.startswith("fc."):
            continue
        if value.ndim == 4:
            value = value.unsqueeze(2).repeat(1, 1, 3 if value.shape[-1] in (3, 7) else 1, 1, 1)
        out[key] = value
    return randomised(out)


def test_released_file_loads_every_encoder_tensor_and_ignores_the_rest(tmp_path):
    known = _inflated_resnet152()
    others = {"encode_image.i3_resnet.classifier.weight": torch.randn(1692, 2048, 1, 1, 1),
              "encode_image.i3_resnet.classifier.bias": torch.randn(1692),
              "encode_image.i3_resnet.contrastive_head.weight": torch.randn(512, 2048, 1, 1, 1),
              "encode_image.i3_resnet.contrastive_head.bias": torch.randn(512),
              "encode_text.linear_layer.weight": torch.randn(512, 768), "logit_scale": torch.ones(())}
    path = tmp_path / "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
    torch.save({**{f"encode_image.i3_resnet.{k}": v for k, v in known.items()}, **others}, path)
    method, cfg, model = setup_public("merlin", path, preset="paper")
    report = encoder_init(method, cfg, model)["load_report"]
    assert report["matched"] == len(known) == 930 and not report["missing"] and not report["shape_mismatched"]
    assert report["ignored_outside_encoder"] == len(others)  # classifier, contrastive head, text tower
    assert_encoder_loaded(method, model, known)


def test_five_year_file_with_the_encoders_own_keys_loads(tmp_path):
    known = _inflated_resnet152()
    path = tmp_path / "resnet_clinical_longformer_five_year_disease_prediction.pt"
    torch.save(known, path)
    method, cfg, model = setup_public("merlin", path, preset="paper")
    encoder_init(method, cfg, model)
    assert_encoder_loaded(method, model, known)


def test_a_resnet50_file_is_one_line_naming_what_did_not_match(tmp_path):
    known = {k: v for k, v in _inflated_resnet152().items() if not k.startswith(("layer2.", "layer3."))}
    path = tmp_path / "partial.pt"
    torch.save(known, path)
    method, cfg, model = setup_public("merlin", path, preset="paper")
    with pytest.raises(BenchError, match="not matched: .*layer2.0.conv1.weight"):
        encoder_init(method, cfg, model)


def test_input_is_depth_first_three_channels_at_merlins_aspect():
    """A RAS crop (X, Y, Z) reaches the stem as (3, Z / 2, X, Y); the I3D strides take in-plane 32x and
    depth 16x, as Merlin's network."""
    from bench.methods.merlin import MerlinEncoder, MerlinParams

    encoder = MerlinEncoder(MerlinParams(layers=[1, 1, 1, 1], width=4))
    seen = {}
    encoder.net.conv1.register_forward_hook(lambda m, i, o: seen.update(stem=i[0].shape))
    encoder.net.layer4.register_forward_hook(lambda m, i, o: seen.update(last=o.shape))
    features = encoder(torch.rand(2, 1, 64, 96, 64))
    assert seen["stem"] == (2, 3, 32, 64, 96) and seen["last"] == (2, 128, 2, 2, 3) and features.shape == (2, 128)


def test_pretext_losses_fall_on_one_batch():
    """The phenotype + report stand-in and the two-view contrast each learn a fixed batch."""
    from bench.config import compose
    from bench.registry import create_method, get_method

    torch.manual_seed(0)
    cfg = compose({"method": "merlin", "preset": "tiny", "regime": "public_to_vertebrae"}, get_method("merlin"))
    method = create_method("merlin", cfg)
    x = torch.rand(4, 1, 32, 32, 32)
    organs = torch.randint(0, 4, (4, 32, 32, 32))
    organs[:2, :16] = 5
    for stage, batch in (("public", (x, organs)), ("vertebrae", x)):
        pretext = method.build_pretext(stage)
        optimiser = torch.optim.Adam(pretext.parameters(), lr=1e-3)
        losses = []
        for _ in range(8):
            torch.manual_seed(1)  # the same views every step
            loss = pretext(batch)["loss"]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (stage, losses)


@pytest.mark.e2e
def test_public_to_vertebrae_through_the_cli(tmp_path):
    out = run_cli("run", "method=merlin", "regime=public_to_vertebrae", "preset=tiny", "epochs=1", "pretrain.epochs=1",
                  f"out={tmp_path}/runs")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(next((tmp_path / "runs" / "single").glob("*/metrics.json")).read_text())
    assert metrics["pretraining"]["plan"] == ["public", "vertebrae"]
