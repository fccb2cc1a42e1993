"""A plain PyTorch loop training a torchvision ResNet-18 on Fashion-MNIST with BAME 1:16 (``bame.attach``).

    python examples/own_loop.py [--epochs 1] [--subset 6000] [--root data]   # data: bame data get fashion-mnist
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision import transforms

import bame

args = argparse.ArgumentParser()
args.add_argument("--epochs", type=int, default=1)
args.add_argument("--subset", type=int, default=None, help="train on the first k images")
args.add_argument("--root", default="data")
args = args.parse_args()
data = torchvision.datasets.FashionMNIST(args.root, train=True, transform=transforms.ToTensor())
data = torch.utils.data.Subset(data, range(args.subset or len(data)))
loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, drop_last=True)

model = torchvision.models.resnet18(num_classes=10)
model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # grey images
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
steps = args.epochs * len(loader)
sp = bame.attach(model, optimizer, method="bame", pattern="1:16", total_steps=steps, interval_steps=10)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

step = 0
for epoch in range(args.epochs):
    for x, y in loader:
        sp.before_step(step)  # masks and gradient masks of this step
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        sp.after_backward(step)  # BAME's scores and selection; masked gradients and decay
        optimizer.step()
        scheduler.step()
        sp.after_optimizer_step(step)  # mask swaps; the step's FLOPs; the recorders
        step += 1
    print(f"epoch {epoch}: loss {loss.item():.3f}, {step} steps, {2 * sp.ledger.total_ideal_macs:.3g} training FLOPs, "
          f"{sp.records.frame('adaptation')['swaps'].sum()} weights swapped")
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "bame": sp.state_dict()}, "own_loop.pt")
