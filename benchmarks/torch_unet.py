"""The PyTorch peer's U-Net and soft Dice loss, shared by the benchmarks.

It imports nothing but the ``torch`` module it is given, so it also runs in an
interpreter that has PyTorch and not tinyunet's dependencies (``real_data``'s child).
"""


def torch_unet(torch, depth: int, base: int):
    """U-Net with 'same' 3x3 convolutions and ReLU, 2x2 max-pooling, 2x2 transposed
    convolutions and skip concatenation, no normalisation: (N, 1, H, W) -> one logit map
    (N, 1, H, W), H and W multiples of 2**depth. The layers are built in a fixed order, so
    one ``torch.manual_seed`` gives one set of initial weights."""
    nn = torch.nn

    def double_conv(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU())

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [base * 2**level for level in range(depth + 1)]
            self.down = nn.ModuleList([double_conv(1 if level == 0 else widths[level - 1],
                                                   widths[level]) for level in range(depth)])
            self.bottom = double_conv(widths[depth - 1], widths[depth])
            self.up = nn.ModuleList([nn.ConvTranspose2d(widths[level + 1], widths[level], 2,
                                                        stride=2) for level in range(depth)])
            self.merge = nn.ModuleList([double_conv(2 * widths[level], widths[level])
                                        for level in range(depth)])
            self.head = nn.Conv2d(base, 1, 1)

        def forward(self, x):
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = nn.functional.max_pool2d(x, 2)
            x = self.bottom(x)
            for level in reversed(range(depth)):
                x = self.merge[level](torch.cat([skips[level], self.up[level](x)], dim=1))
            return self.head(x)

    return UNet()


def soft_dice_loss(torch, logits, target, smooth: float = 1.0):
    """1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth) per sample, p = sigmoid(logits),
    averaged over the batch; logits and target (N, 1, H, W)."""
    p = torch.sigmoid(logits)
    overlap = (p * target).sum(dim=(1, 2, 3))
    total = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    return (1 - (2 * overlap + smooth) / (total + smooth)).mean()
