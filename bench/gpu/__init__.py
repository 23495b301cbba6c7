"""The GPU benchmark (`python -m bench.gpu`): SD3.5 Medium's architecture, lever by lever."""
