"""The 4-block convolutional learner of Vinyals et al. 2016 and Finn et al. 2017 (section 5.2).

Each block: 3x3 convolution, batch norm, ReLU, then 2x2 max-pooling (or, for the
paper's Omniglot variant, stride-2 convolutions instead of pooling). Batch norm
uses the statistics of the batch it is given and keeps no running statistics
(``track_running_stats=False``), as in the MAML code; its scale and shift are
ordinary parameters, adapted in the inner loop like every other. The head reads the
flattened last feature map (256 features for the strided 28x28 net).

``authors=True`` builds the learner of the authors' TensorFlow code (cbfinn/maml,
``construct_conv_weights``, ``forward_conv`` and ``conv_block``) instead: batch norm
with a shift and no scale (``tf.contrib.layers.batch_norm``'s defaults: the scale is
a constant 1 here, a parameter that never trains, and epsilon is 1e-3), its shift
meta-learned but not adapted in the inner loop (``inner_loop_parameters``);
Xavier-uniform convolutions, zero biases; on the strided Omniglot net the last 2x2
feature map averaged into 64 features before a head initialised N(0, 1), on the
pooled net a Xavier-uniform head on the flattened map.
"""

from torch import Tensor, nn


class Conv4(nn.Module):
    """4 x [conv3x3(hidden), BN, ReLU, pool] and a linear head to ``n_way`` logits (pool before ReLU: equal).

    ``image_size`` 28 (Omniglot) -> 14 -> 7 -> 3 -> 1 (strided: -> 14 -> 7 -> 4 -> 2); 84 (miniImageNet) -> 5 x 5 features.
    ``authors``: the authors' code's variant (module docstring).
    """

    def __init__(
        self, n_way: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28, strided: bool = False,
        authors: bool = False,
    ):  # fmt: skip
        super().__init__()
        layers, channels, size = [], in_channels, image_size
        for _ in range(4):
            conv = nn.Conv2d(channels, hidden, 3, stride=2 if strided else 1, padding=1)
            layers += [conv, nn.BatchNorm2d(hidden, eps=1e-3 if authors else 1e-5, track_running_stats=False)]
            # ReLU after the pool: relu(max(window)) = max(relu(window)), and the gradients of every
            # order reach the same elements, so the network is the paper's bit for bit (tests/models),
            # with the ReLU on a quarter of the elements
            layers += [nn.ReLU()] if strided else [nn.MaxPool2d(2), nn.ReLU()]
            size = (size + 1) // 2 if strided else size // 2
            channels = hidden
        self.features = nn.Sequential(*layers)
        self.authors = authors
        self.average_features = authors and strided  # the authors' Omniglot net: mean over the last map
        self.head = nn.Linear(hidden if self.average_features else hidden * size * size, n_way)
        if authors:
            self._init_as_the_authors()

    def _init_as_the_authors(self):
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)  # no scale: a constant 1
        if self.average_features:
            nn.init.normal_(self.head.weight)
        else:
            nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def inner_loop_parameters(self) -> list[str]:
        """Names of the parameters the inner loop adapts: all of them; the authors' variant: all but batch norm's."""
        norms = {f"features.{i}" for i, m in enumerate(self.features) if isinstance(m, nn.BatchNorm2d)}
        return [n for n, _ in self.named_parameters() if not (self.authors and n.rsplit(".", 1)[0] in norms)]

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)  # (B, C, H, W)
        return self.head(features.mean((2, 3)) if self.average_features else features.flatten(1))  # -> (B, n_way)
