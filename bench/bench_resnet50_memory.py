"""ResNet-50 training memory per GPU, estimated on the CPU: the tensors autograd saves for the
backward pass, counted once each, at two small batches; their difference per image scaled to a
per-GPU batch.

``saved_tensors_hooks`` sees every tensor a forward keeps for its backward (activations,
BatchNorm inputs, ReLU outputs, pooling indices); tensors sharing storage are counted once (by
storage pointer). Model state is ``parameters x 4 B`` for each of weights, gradients and SGD
momentum; a SAM step also holds the gradient at w, the perturbation e and a copy of the
weights (``GroupSAM._grad_at``): three more (SSE-SAM's per-group gradients add one per
group). Not counted: the allocator's fragmentation, cuDNN workspaces, the CUDA context (about
0.5 GB), and the temporaries of the backward pass itself.

    python bench/bench_resnet50_memory.py                  # batches 2 and 4 at 224 px
    python bench/bench_resnet50_memory.py --batch 256 --gpus 1 2 4 8
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch
import torch.nn.functional as F

from train.models import build_model, count_parameters

GB = 1e9


def saved_bytes(model: torch.nn.Module, batch: int, size: int) -> int:
    """Bytes of the distinct storages autograd saves in one training forward of ``batch``."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()  # the graph was complete
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in storages.items() if ptr not in parameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--small", type=int, nargs=2, default=[2, 4])
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("resnet50", (3, args.size, args.size), 1000).train()
    n = count_parameters(model)
    a, b = (saved_bytes(model, k, args.size) for k in args.small)
    per_image = (b - a) / (args.small[1] - args.small[0])
    state = 3 * 4 * n
    print(f"{datetime.date.today()}, {platform.machine()}, torch {torch.__version__}")
    print(f"parameters {n:,}; weights + gradients + momentum {state / GB:.2f} GB "
          f"(+ {3 * 4 * n / GB:.2f} GB for SAM's gradient at w, e and saved weights)")
    print(f"saved activations: batch {args.small[0]} {a / GB:.3f} GB, batch {args.small[1]} "
          f"{b / GB:.3f} GB: {per_image / 1e6:.1f} MB per image (float32, {args.size} px)")
    print("| GPUs | images per GPU | activations GB | + state (SGD) GB | + state (SAM) GB |")
    print("|---|---|---|---|---|")
    for g in args.gpus:
        per_gpu = -(-args.batch // g)
        act = per_gpu * per_image
        print(f"| {g} | {per_gpu} | {act / GB:.1f} | {(act + state) / GB:.1f} | "
              f"{(act + state + 3 * 4 * n) / GB:.1f} |")


if __name__ == "__main__":
    main()
