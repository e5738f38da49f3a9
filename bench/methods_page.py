"""The documentation's method list, generated from the registry: `python -m bench.methods_page > docs/methods.md`.

A test checks that the committed page equals what this prints, so the page cannot drift from the
registered methods.
"""
from __future__ import annotations


def methods_page() -> str:
    from bench.registry import get_method, list_methods

    lines = ["# Methods", "",
             "Every registered method, generated from the registry (`python -m bench.methods_page > docs/methods.md`;",
             "a test keeps this page equal to it). `bench list methods` prints the same from the command line,",
             "plugins included. [Methods and regimes in detail](regimes.md) describes each one.", "",
             "| method | regimes | input | published weights | description |", "|---|---|---|---|---|"]
    for name in list_methods():
        if name.startswith("_"):
            continue
        cls = get_method(name)
        spec = getattr(cls, "public_weights", None)
        if spec is None:
            weights = "-"
        else:
            weights = f"`{spec.source}`" if spec.source else f"{spec.filename} (no download address)"
        lines.append(f"| `{name}` | {', '.join(cls.regimes)} | {cls.input_format} | {weights} | {cls.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(methods_page(), end="")
