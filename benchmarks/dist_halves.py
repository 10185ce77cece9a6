"""Diagnostic: `python -m bitdown` in ONE process whose per-layer and global distillation gradient is computed
exactly as 2 gloo ranks compute it: the batch's two `dist.part` halves forward/backward separately (KL summed over
the rows / the whole batch's rows), gradients summed in fp32 (g0 + g1, what a 2-rank all-reduce gives).

    OMP_NUM_THREADS=1 python benchmarks/dist_halves.py compress --model resnet20_cifar10 --data ... --out halves.bitdown

Its file is byte-identical to `torchrun --nproc-per-node 2 -m bitdown compress ... ` (same options, one thread per
rank): measured on ResNet-20, 256 calibration images, 10 per-layer + 1 global step (which the holdout guard undid), holdout on. The plain one-process
run differs from both (20.2 % identical codes): the only difference between 1 and 2 ranks is the fp32 summation
order of the gradient (one backward over 64 rows vs two over 32), which Adam's sign-like first steps keep and the
int8 codebook rounding occasionally turns into a one-quantum codeword difference; every later layer's EM then
starts from other inputs. Only the KL (class logits) loss without mixup is emulated."""
import sys

import torch

import bitdown.finetune as F
from bitdown.finetune import distill_loss, mix_batch


def _step_halves(student, teacher, x, opt, cfg, step, seed, n_total=None):
    assert n_total is None and cfg.mixup == 0, "one process, no mixup"
    x = x.to(next(iter(opt.param_groups[0]["params"])).device)
    x = mix_batch(x, cfg.mixup, seed, step)
    n = x.shape[0]
    h = (n + 1) // 2                                    # dist.part(n) for ranks 0 and 1
    params = [p for g in opt.param_groups for p in g["params"]]
    grads, total = [], torch.zeros(())
    for rows in (slice(0, h), slice(h, n)):
        xs = x[rows]
        if xs.dim() == 4:
            xs = xs.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            zt = teacher(xs)
        loss = distill_loss(student(xs), zt, cfg.temperature, cfg.loss, n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        total = total + loss.detach().float()
    for p, g0, g1 in zip(params, *grads):
        p.grad = g0 + g1
    opt.step()
    return float(total)


if __name__ == "__main__":
    F._step = _step_halves
    from bitdown.cli import main
    sys.exit(main(sys.argv[1:]))
