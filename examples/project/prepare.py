"""Make this project's data and checkpoint: ``python prepare.py`` (in this folder).

Writes ``data/train.pt`` (1600 images: 100 batches of 16, the project file's batch size),
``data/val.pt`` (400 images), both ``{"x": images, "y": labels}``, and ``runs/ckpt.pt``, a
model trained briefly in plain PyTorch and saved as training scripts save it
(``{"model": state_dict, "epoch": ...}``). The images are 3x16x16 noise of random brightness
with a faint 4x4 square in the quadrant of the class (4 classes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from model import make_model
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) + torch.rand(n, 1, 1, 1, generator=g) * 2
    offsets = torch.randint(0, 5, (n, 2), generator=g)
    for i in range(n):
        row, col = divmod(int(y[i]), 2)
        top, left = 8 * row + int(offsets[i, 0]), 8 * col + int(offsets[i, 1])
        x[i, :, top : top + 4, left : left + 4] += 1.0
    return x, y


def main() -> None:
    (HERE / "data").mkdir(exist_ok=True)
    (HERE / "runs").mkdir(exist_ok=True)
    x, y = make_images(1600, seed=0)
    torch.save({"x": x, "y": y}, HERE / "data" / "train.pt")
    vx, vy = make_images(400, seed=1)
    torch.save({"x": vx, "y": vy}, HERE / "data" / "val.pt")

    torch.manual_seed(0)
    model = make_model()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, drop_last=True)
    epochs = 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.save({"model": model.state_dict(), "epoch": epochs}, HERE / "runs" / "ckpt.pt")
    print(f"wrote {HERE / 'data'} (train.pt, val.pt) and {HERE / 'runs' / 'ckpt.pt'}")


if __name__ == "__main__":
    main()
