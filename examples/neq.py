"""NEq in a plain PyTorch loop: neurons at equilibrium are not updated in the next epoch.

python examples/neq.py [--dataset mnist --data-root DIR] [--epochs 20] [--max-batches 5]
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
parser.add_argument("--eps", type=float, default=1e-3, help="velocity threshold for freezing")
args = parser.parse_args()

torch.manual_seed(0)
full = data.load(args.dataset, "train", root=args.data_root)
train, val = data.train_val_split(full, val_fraction=0.1, seed=0)
train_loader = data.TensorLoader(train, batch_size=32, shuffle=True, seed=0)
model = nw.models.create("lenet300", image_size=full.images.shape[-1])
example = full.images[:1]

optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
# A fixed validation subset: its outputs, compared epoch to epoch, tell which neurons settled.
neq = nw.NEq(model, val.images[:100], eps=args.eps, mu=0.5)
neq.attach(optimizer)  # frozen neurons: no gradient, no weight decay, no momentum
dense_flops = nw.metrics.backward_flops(model, example)
for epoch in range(args.epochs):
    train_loader.set_epoch(epoch)
    for batch, (x, y) in enumerate(train_loader):
        if batch == args.max_batches:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    neq.step()  # similarity, velocity, and the next epoch's frozen neurons
    saving = 100 * (1 - neq.backward_flops(example) / dense_flops)
    print(f"epoch {epoch + 1}: next epoch freezes {100 * neq.frozen_fraction():.1f}% of the "
          f"hooked neurons, backward FLOPs saving {saving:.1f}% (a convention, not time)")
