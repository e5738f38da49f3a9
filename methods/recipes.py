"""Finetuning recipes that several model families share (one place, imported by each family's presets)."""

# How the transformers are finetuned at the CPU preset: the MAE fine-tuning recipe (He et al. 2022,
# Table 9: base lr 1e-3 scaled by batch/256, layer-wise lr decay 0.75, label smoothing 0.1, warmup),
# with the head started from the linear probe of the frozen features (LP-FT, Kumar et al. 2022,
# "Fine-tuning can distort pretrained features"), kept behind MAE's linear-probe BatchNorm (no affine).
# Why: with a random head, six epochs on a few hundred crops left every transformer at its starting
# loss, predicting one class. Their features differ between crops by about 1e-3 of their size, so
# a probe's weights are large; the norm standardises by batch statistics in training, which keeps the
# logits at the probe's scale while the encoder moves. Stochastic depth is off at this preset (MAE
# uses 0.1): its noise is larger than those differences and drowned the signal (docs/configuration.md,
# "Why the per-method presets"). `paper` keeps the paper's recipe.
TRANSFORMER_FINETUNE = {"lr": 1.0e-3 * 16 / 256, "layer_decay": 0.75, "label_smoothing": 0.1,
                        "head_init": "linear_probe"}
