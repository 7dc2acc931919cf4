"""Run against a checkout of 0.1.0 (PYTHONPATH=<that checkout>): writes tests/data/checkpoints_0_1_0.pt,
optimizer checkpoints of bregman_fused 0.1.0 (before the backends/optim restructure) plus what that
version computed when it continued from them, so the new code can be checked to load and continue
(tests/test_checkpoint_compat.py)."""
import copy
import sys
import torch
import bregman_fused as bf

torch.manual_seed(0)
shapes = [(6, 5), (7,), (4, 3, 3, 3)]
regs = {"l1": lambda: bf.L1(0.05), "group": lambda: bf.GroupL1L2(0.05)}
opts = {
    "linbreg": lambda ps, reg, backend: bf.LinBreg(ps, lr=0.1, reg=reg, delta=1.3, backend=backend),
    "linbreg_momentum": lambda ps, reg, backend: bf.LinBreg(ps, lr=0.1, reg=reg, momentum=0.8, backend=backend),
    "adabreg": lambda ps, reg, backend: bf.AdaBreg(ps, lr=1e-2, reg=reg, betas=(0.8, 0.95), eps=1e-6, backend=backend),
    "proxsgd": lambda ps, reg, backend: bf.ProxSGD(ps, lr=0.1, reg=reg, backend=backend),
}
theta0 = [torch.randn(s) * 0.3 for s in shapes]
grads = [[torch.randn(s) for s in shapes] for _ in range(6)]
out = {"theta0": theta0, "grads": grads, "cases": {}}
for backend in ("reference", "cpu"):
    for oname, make in opts.items():
        for rname, mreg in regs.items():
            ps = [torch.nn.Parameter(t.clone()) for t in theta0]
            opt = make(ps, mreg(), backend)
            for g in grads[:3]:
                for p, gi in zip(ps, g):
                    p.grad = gi.clone()
                opt.step()
            ckpt = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
            theta_at_ckpt = [p.detach().clone() for p in ps]
            for g in grads[3:]:
                for p, gi in zip(ps, g):
                    p.grad = gi.clone()
                opt.step()
            after = opt.state_dict()
            out["cases"][f"{backend}-{oname}-{rname}"] = dict(
                checkpoint=ckpt, theta_at_checkpoint=theta_at_ckpt, theta_after=[p.detach().clone() for p in ps],
                state_after=after["state"], density_after=opt.density())
torch.save(out, sys.argv[1])
print(len(out["cases"]), "cases")
