"""The 4-block convolutional learner of Vinyals et al. 2016 and Finn et al. 2017 (section 5.2).

Each block: 3x3 convolution, batch norm, ReLU, then 2x2 max-pooling (or, for the
paper's Omniglot variant, stride-2 convolutions instead of pooling). Batch norm
uses the statistics of the batch it is given and keeps no running statistics
(``track_running_stats=False``), as in the MAML code; its scale and shift are
ordinary parameters, adapted in the inner loop like every other. The head reads the
flattened last feature map (256 features for the strided 28x28 net; the authors' code
averages that 2x2 map into 64: README.md lists this and the other differences).
"""

from torch import Tensor, nn


class Conv4(nn.Module):
    """4 x [conv3x3(hidden), BN, ReLU, pool] and a linear head to ``n_way`` logits (pool before ReLU: equal).

    ``image_size`` 28 (Omniglot) -> 14 -> 7 -> 3 -> 1 (strided: -> 14 -> 7 -> 4 -> 2); 84 (miniImageNet) -> 5 x 5 features.
    """

    def __init__(self, n_way: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28, strided: bool = False):
        super().__init__()
        layers, channels, size = [], in_channels, image_size
        for _ in range(4):
            conv = nn.Conv2d(channels, hidden, 3, stride=2 if strided else 1, padding=1)
            layers += [conv, nn.BatchNorm2d(hidden, track_running_stats=False)]
            # ReLU after the pool: relu(max(window)) = max(relu(window)), and the gradients of every
            # order reach the same elements, so the network is the paper's bit for bit (tests/models),
            # with the ReLU on a quarter of the elements
            layers += [nn.ReLU()] if strided else [nn.MaxPool2d(2), nn.ReLU()]
            size = (size + 1) // 2 if strided else size // 2
            channels = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden * size * size, n_way)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))  # (B, C, H, W) -> (B, n_way)
