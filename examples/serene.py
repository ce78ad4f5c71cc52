"""SeReNe in a plain PyTorch loop: whole neurons die, then simplify removes them.

python examples/serene.py [--dataset mnist --data-root DIR] [--epochs 20] [--max-batches 5]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import neuronwise as nw
from neuronwise import data
from neuronwise.simplify import simplify

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", help="folder holding MNIST/raw/*.gz (default: $NEURONWISE_DATA)")
parser.add_argument("--dataset", default="digits", choices=["mnist", "fashion-mnist", "digits"])
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--max-batches", type=int, help="stop each epoch after this many batches")
parser.add_argument("--patience", type=int, default=3, help="epochs of plateau before pruning")
parser.add_argument("--lam", type=float, default=1e-2, help="SeReNe's decay strength")
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
regularizer = nw.SeReNe(model, lam=args.lam)  # W[k] <- W[k] - lam * relu(1 - S_k) * W[k], per neuron k
pruner = nw.PruneOnPlateau(model, evaluate=val_loss, patience=args.patience, tolerance=0.05,
                           modules=(nn.Linear, nn.Conv2d), mask=regularizer.mask)
for epoch in range(args.epochs):
    train_loader.set_epoch(epoch)
    for batch, (x, y) in enumerate(train_loader):
        if batch == args.max_batches:
            break
        optimizer.zero_grad()
        logits = model(x)
        regularizer.compute(logits)  # neuron sensitivities, before optimizer.step()
        F.cross_entropy(logits, y).backward()
        optimizer.step()
        regularizer.step()
    pruner.step(val_loss())
    alive, total = nw.metrics.count_neurons(model)["total"]
    print(f"epoch {epoch + 1}: {alive}/{total} neurons alive")
small = simplify(model, full.images[:1])  # a new module without the dead neurons, same outputs
print(f"simplified: {nw.metrics.count_parameters(small, 'all'):,} parameters "
      f"(dense: {nw.metrics.count_parameters(model, 'all'):,})")
