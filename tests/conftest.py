"""Test-wide set-up. Triton kernels run through the interpreter on machines without CUDA; the
variable must be set before any kernel module is imported, which is why it lives here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
