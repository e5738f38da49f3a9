"""Engstler et al.'s head must be able to learn: with channel dropout on its narrow final conv
map, the training loss stayed at ln 2 on the synthetic benchmark (fixed; this guards it)."""
import torch

from bench.config import compose
from bench.registry import create_method, get_method


def test_engstler_fits_a_small_batch():
    cfg = compose({"method": "engstler", "preset": "tiny", "regime": "scratch"}, get_method("engstler"))
    torch.manual_seed(0)
    model = create_method("engstler", cfg).build_model()
    x, y = torch.rand(16, 1, 32, 32, 32), torch.randint(0, 2, (16,))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(model(x), y) < 0.3
