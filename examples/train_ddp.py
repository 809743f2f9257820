"""Train a slim-neck YOLOv5 on several processes with DistributedDataParallel.

The rewritten model is an ordinary ``nn.Module``: it goes into ``DistributedDataParallel`` (and, on GPUs,
``SyncBatchNorm``) like the original would. Launched with torchrun, one process per GPU (or per CPU worker)::

    torchrun --nproc-per-node 2 examples/train_ddp.py --model yolov5s --steps 20
    torchrun --nproc-per-node 8 examples/train_ddp.py --model yolov5s --imgsz 640 --batch 16   # 8 GPUs: nccl

With no arguments and no torchrun it spawns 2 CPU processes itself and trains a few steps: a short demo::

    python examples/train_ddp.py

The batches are synthetic (random images, random dense targets) and the loss is a dense stand-in for the YOLOv5
loss (objectness and classes with BCE, boxes with MSE where there is an object): what this shows is the
distributed machinery around a rewritten model, not a detector learning. For a real loss and real data, see
``examples/train_ultralytics.py``. Each rank draws its own batches; after the last step rank 0 gathers a checksum
of every rank's parameters and checks that they are identical, and every rank checks that every parameter got
a gradient (so the loss went through every GS block). ``--out DIR`` writes what each rank saw to
``DIR/rank<N>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import rewrite
from rewrite.zoo import create_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov5n", help="a zoo model (default: yolov5n)")
    parser.add_argument(
        "--rules", default="slim-neck", help="a rule set name or TOML file (default: slim-neck)"
    )
    parser.add_argument("--nc", type=int, default=3, help="number of classes (default: 3)")
    parser.add_argument("--imgsz", type=int, default=64, help="image size (default: 64)")
    parser.add_argument("--batch", type=int, default=2, help="images per process and step (default: 2)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (default: 3)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument(
        "--nproc", type=int, default=2, help="processes to spawn when not launched by torchrun (default: 2)"
    )
    parser.add_argument("--out", type=Path, help="write each rank's losses, checksum and checks here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # torchrun set up the process group's environment
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    mp.spawn(train, args=(args.nproc, args), nprocs=args.nproc)


def train(rank: int, world_size: int, args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        report = run(rank, world_size, backend, device, args)
    finally:
        dist.destroy_process_group()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank{rank}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    if report["without_grad"]:
        sys.exit(f"rank {rank}: no gradient reached {', '.join(report['without_grad'][:5])}")


def run(rank: int, world_size: int, backend: str, device: torch.device, args: argparse.Namespace) -> dict:
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(0)  # the same model on every rank (DDP would broadcast rank 0's weights anyway)
    model = create_model(args.model, nc=args.nc)
    slim = rewrite.apply(model.eval(), args.rules, torch.zeros(1, 3, args.imgsz, args.imgsz)).train()
    gs_blocks = [name for name, m in slim.named_modules() if isinstance(m, rewrite.GSConv | rewrite.VoVGSCSP)]
    if backend == "nccl":  # SyncBatchNorm runs on GPUs: statistics over the global batch
        slim = nn.SyncBatchNorm.convert_sync_batchnorm(slim)
    slim = slim.to(device)
    ddp = DistributedDataParallel(slim, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    say(
        f"{args.model} with {args.rules}: {len(gs_blocks)} GS block(s), {world_size} process(es), backend "
        f"{backend}, batch {args.batch} per process at {args.imgsz}x{args.imgsz}"
    )

    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, as a sampler would
    losses, without_grad = [], []
    for step in range(args.steps):
        images = torch.rand(args.batch, 3, args.imgsz, args.imgsz, generator=generator).to(device)
        maps = ddp(images)
        loss = dense_loss(maps, synthetic_targets(maps, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            without_grad = [n for n, p in slim.named_parameters() if p.grad is None or not p.grad.abs().sum()]
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(loss.item())
        say(
            f"step {step + 1}/{args.steps}: loss {mean.item() / world_size:.4f} (mean over {world_size} ranks)"
        )

    checksum = parameters_sha256(slim)
    checksums = [None] * world_size
    dist.all_gather_object(checksums, checksum)
    identical = len(set(checksums)) == 1
    say(
        f"parameters after {args.steps} step(s): {'identical' if identical else 'DIFFERENT'} on all "
        f"{world_size} ranks (sha256 {checksum[:16]}…)"
    )
    say(
        f"gradients: {sum(1 for _ in slim.parameters()) - len(without_grad)}/{sum(1 for _ in slim.parameters())} "
        f"parameter tensors got one, through all {len(gs_blocks)} GS blocks"
        if not without_grad
        else f"gradients: none reached {', '.join(without_grad[:5])}"
    )
    return {
        "rank": rank,
        "world_size": world_size,
        "backend": backend,
        "losses": losses,
        "params_sha256": checksum,
        "all_params_sha256": checksums,
        "parameters": sum(1 for _ in slim.parameters()),
        "without_grad": without_grad,
        "gs_blocks": gs_blocks,
        "sync_batchnorm": sum(isinstance(m, nn.SyncBatchNorm) for m in slim.modules()),
    }


def synthetic_targets(maps: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Per level, a target of the prediction's shape: about 5 % of the anchors hold an object of a random class."""
    targets = []
    for p in maps:
        shape = p.shape[:-1]
        nc = p.shape[-1] - 5
        objects = (torch.rand(shape, generator=generator) < 0.05).float()
        boxes = torch.rand((*shape, 4), generator=generator)
        classes = F.one_hot(torch.randint(nc, shape, generator=generator), nc).float()
        targets.append(torch.cat((boxes, objects.unsqueeze(-1), classes), -1).to(p.device))
    return targets


def dense_loss(maps: list[Tensor], targets: list[Tensor]) -> Tensor:
    """Objectness BCE everywhere; box MSE (after a sigmoid) and class BCE where the target holds an object."""
    total = maps[0].new_zeros(())
    for p, t in zip(maps, targets, strict=True):
        objects = t[..., 4] > 0
        total = total + F.binary_cross_entropy_with_logits(p[..., 4], t[..., 4])
        if objects.any():
            total = total + F.mse_loss(p[..., :4][objects].sigmoid(), t[..., :4][objects])
            total = total + F.binary_cross_entropy_with_logits(p[..., 5:][objects], t[..., 5:][objects])
    return total


def parameters_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
