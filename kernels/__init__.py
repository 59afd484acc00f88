"""Triton kernels of the fused ops (`flow_grpo`) and their ahead-of-time compile check (`aot`).
Host launchers and autograd live in tempflow_fast.ops; the PyTorch reference of each kernel is
tempflow_fast.ops.reference."""
