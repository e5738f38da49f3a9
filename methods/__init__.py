"""Built-in methods. Importing this package registers them (one module per method family)."""
from bench.methods import (  # noqa: F401
    cnn,
    ctfm,
    mae3d,
    merlin,
    models_genesis,
    openmind,
    spectre,
    supcon,
    suprem,
    swin_unetr,
    video_cnn,
    video_mae,
    vit,
    vit_unetr,
    voco,
)
