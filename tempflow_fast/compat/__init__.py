"""Drop-in replacements for functions of other flow-RL codebases, backed by tempflow_fast.ops."""
