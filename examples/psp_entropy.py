"""PSP-entropy of a trained network: how class-specific each unit's sign is (bits per unit).

python examples/psp_entropy.py --data-root DIR [--epochs 2] [--max-batches 5] [--dataset digits]
"""

import argparse

import torch
import torch.nn.functional as F

import neuronwise as nw
from neuronwise import data

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", help="folder holding MNIST/raw/*.gz (default: $NEURONWISE_DATA)")
parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "digits"])
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--max-batches", type=int, help="stop each epoch after this many batches")
args = parser.parse_args()

torch.manual_seed(0)
train = data.load(args.dataset, "train", root=args.data_root)
test = data.load(args.dataset, "test", root=args.data_root)
train_loader = data.TensorLoader(train, batch_size=100, shuffle=True, seed=0)
model = nw.models.create("lenet5" if train.images.shape[-1] >= 16 else "lenet300",
                         image_size=train.images.shape[-1])
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for epoch in range(args.epochs):
    train_loader.set_epoch(epoch)
    for batch, (x, y) in enumerate(train_loader):
        if batch == args.max_batches:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

# One pass over labelled data; a unit is an element of a Linear/Conv2d output (pre-activation).
# H(u) = sum over classes c of the binary entropy of P(z_u > 0 | class c); at most C bits.
entropy = nw.psp_entropy(model, data.TensorLoader(test, batch_size=1000))
for name, layer in entropy.items():
    print(f"{name}: {layer.per_unit.numel()} units, mean H {layer.mean:.3f} bits "
          f"(max {layer.per_unit.max():.3f})")
