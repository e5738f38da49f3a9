"""Built-in methods. Importing this package registers them (one module per method family)."""
from bench.methods import (  # noqa: F401
    cnn,
    ctfm,
    merlin,
    mae3d,
    models_genesis,
    openmind,
    supcon,
    suprem,
    swin_unetr,
    video_cnn,
    video_mae,
    vit,
    vit_unetr,
    voco,
)
