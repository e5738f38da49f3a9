"""Built-in methods. Importing this package registers them (one module per method family)."""
from bench.methods import cnn, mae3d, models_genesis, swin_unetr, video_mae, vit, vit_unetr  # noqa: F401
