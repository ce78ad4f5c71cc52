"""LOBSTER in a plain PyTorch loop: sensitivity decay + pruning on validation plateaus.

python examples/lobster.py [--dataset mnist --data-root DIR] [--epochs 20] [--max-batches 5]
"""

import argparse

import torch
import torch.nn.functional as F

import neuronwise as nw
from neuronwise import data

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", help="folder holding MNIST/raw/*.gz (default: $NEURONWISE_DATA)")
parser.add_argument("--dataset", default="digits", choices=["mnist", "fashion-mnist", "digits"])
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--max-batches", type=int, help="stop each epoch after this many batches")
parser.add_argument("--patience", type=int, default=3, help="epochs of plateau before pruning")
parser.add_argument("--lam", type=float, default=1e-3, help="LOBSTER's decay strength")
args = parser.parse_args()

torch.manual_seed(0)
full = data.load(args.dataset, "train", root=args.data_root)
train, val = data.train_val_split(full, val_fraction=0.1, seed=0)
train_loader = data.TensorLoader(train, batch_size=32, shuffle=True, seed=0)
val_loader = data.TensorLoader(val, batch_size=1000)
model = nw.models.create("lenet300", image_size=full.images.shape[-1])


@torch.no_grad()
def val_loss() -> float:
    model.eval()
    total = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in val_loader)
    model.train()
    return total / len(val)


optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
regularizer = nw.Lobster(model, lam=args.lam)  # p <- p - lam * p * relu(1 - |dL/dp|)
pruner = nw.PruneOnPlateau(model, evaluate=val_loss, patience=args.patience, tolerance=0.05,
                           mask=regularizer.mask)  # one mask: pruned weights stay at zero
for epoch in range(args.epochs):
    train_loader.set_epoch(epoch)
    for batch, (x, y) in enumerate(train_loader):
        if batch == args.max_batches:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        regularizer.step()  # after optimizer.step(), every step
    loss = val_loss()
    pruner.step(loss)  # bisects a global magnitude threshold when the loss plateaus
    report = nw.metrics.sparsity_report(model, "paper")
    print(f"epoch {epoch + 1}: val loss {loss:.4f}, "
          f"remaining {report['remaining_percent']:.2f}% of {report['total']:,} parameters")
