"""gradalign.models: shapes, parameter counts, the papers' formulas, causality, names and option
checks."""

import pytest
import torch
from omegaconf import OmegaConf

from gradalign.models.cnn import CNN
from gradalign.models.cnn2d import CNN2d
from gradalign.models.gru import GRU
from gradalign.models.mlp import MLP
from gradalign.models.transformer import Transformer


def mlp(hidden=(100, 100), residual=True, input_dim=40, n_classes=10):
    return MLP(input_shape=[input_dim], n_classes=n_classes, hidden=hidden, residual=residual)


def cnn(channels=25, input_dim=40, n_classes=10):
    return CNN(input_shape=[input_dim], n_classes=n_classes, channels=channels)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "model",
    [mlp(), mlp(residual=False), mlp(hidden=[]), mlp([64, 32]), cnn(), cnn(channels=3)],
    ids=str,
)
def test_output_shape(model):
    assert model(torch.randn(7, 40)).shape == (7, 10)


def test_mlp_parameter_count():
    expected = 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert n_params(mlp(residual=True)) == expected
    assert n_params(mlp(residual=False)) == expected
    assert n_params(mlp(hidden=[])) == 40 * 10 + 10  # logistic regression
    expected = 20 * 64 + 64 + 64 * 32 + 32 + 32 * 3 + 3
    assert n_params(mlp([64, 32], input_dim=20, n_classes=3)) == expected


@pytest.mark.parametrize("channels", [25, 7])
def test_cnn_parameter_count(channels):
    c = channels
    convs = (1 * c * 5 + c) + 2 * (c * c * 3 + c)
    head = c * 5 * 10 + 10  # length 40 -> 19 -> 10 -> 5
    assert n_params(cnn(channels=c)) == convs + head


def test_parameter_names_are_stable():
    assert [name for name, _ in mlp().named_parameters()] == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
        "layers.2.weight",
        "layers.2.bias",
    ]
    assert [name for name, _ in cnn().named_parameters()] == [
        "convs.0.weight",
        "convs.0.bias",
        "convs.1.weight",
        "convs.1.bias",
        "convs.2.weight",
        "convs.2.bias",
        "head.weight",
        "head.bias",
    ]


def linear(layer, x):
    return x @ layer.weight.T + layer.bias


# [40, 40]: the input layer never skips, even when its width equals the hidden width.
@pytest.mark.parametrize("width", [100, 40])
def test_residual_mlp_matches_the_papers_formula(width):
    torch.manual_seed(0)
    model = mlp(hidden=[width, width], residual=True, input_dim=40)
    l1, l2, l3 = model.layers
    x = torch.randn(5, 40)
    h = torch.relu(linear(l1, x))
    h = h + torch.relu(linear(l2, h))
    torch.testing.assert_close(model(x), linear(l3, h))


def test_residual_skips_only_equal_width_hidden_layers():
    torch.manual_seed(0)
    model = mlp(hidden=[100, 100, 50, 50], residual=True)
    l1, l2, l3, l4, out = model.layers
    x = torch.randn(5, 40)
    h = torch.relu(linear(l1, x))
    h = h + torch.relu(linear(l2, h))
    h = torch.relu(linear(l3, h))  # 100 -> 50: no skip
    h = h + torch.relu(linear(l4, h))
    torch.testing.assert_close(model(x), linear(out, h))


def test_plain_mlp_has_no_skip():
    torch.manual_seed(0)
    model = mlp(hidden=[100, 100], residual=False)
    l1, l2, l3 = model.layers
    x = torch.randn(5, 40)
    expected = linear(l3, torch.relu(linear(l2, torch.relu(linear(l1, x)))))
    torch.testing.assert_close(model(x), expected)


def test_cnn_matches_the_papers_convbase():
    torch.manual_seed(0)
    model = cnn(channels=4)
    c1, c2, c3 = model.convs
    x = torch.randn(3, 40)
    h = torch.relu(torch.conv1d(x[:, None, :], c1.weight, c1.bias, stride=2, padding=1))
    h = torch.relu(torch.conv1d(h, c2.weight, c2.bias, stride=2, padding=1))
    h = torch.relu(torch.conv1d(h, c3.weight, c3.bias, stride=2, padding=1))
    assert h.shape == (3, 4, 5)
    torch.testing.assert_close(model(x), linear(model.head, h.reshape(3, 20)))


def test_mlp_flattens_multidimensional_examples():
    torch.manual_seed(0)
    model = MLP(input_shape=[2, 20], n_classes=10, hidden=[16], residual=False)
    x = torch.randn(3, 2, 20)
    torch.testing.assert_close(model(x), model(x.reshape(3, 40)))


def test_cnn_takes_channels_from_a_two_dimensional_input_shape():
    model = CNN(input_shape=[3, 40], n_classes=10, channels=4)
    assert model.convs[0].in_channels == 3
    assert model(torch.randn(2, 3, 40)).shape == (2, 10)


def test_omegaconf_list_is_accepted():
    model = mlp(hidden=OmegaConf.create([16, 16]))
    assert [layer.out_features for layer in model.layers] == [16, 16, 10]


@pytest.mark.parametrize(
    ("model", "kwargs", "needle"),
    [
        (MLP, {"hidden": [8, 0], "residual": True}, "model.hidden=[8, 0]"),
        (MLP, {"hidden": [8, -3], "residual": True}, "model.hidden=[8, -3]"),
        (MLP, {"hidden": [8, 2.5], "residual": True}, "model.hidden=[8, 2.5]"),
        (MLP, {"hidden": "100", "residual": True}, "model.hidden='100'"),
        (MLP, {"hidden": 100, "residual": True}, "model.hidden=100"),
        (MLP, {"hidden": [8], "residual": "yes"}, "model.residual='yes'"),
        (CNN, {"channels": 0}, "model.channels=0"),
        (CNN, {"channels": True}, "model.channels=True"),
    ],
)
def test_bad_options_are_rejected_naming_the_option_and_value(model, kwargs, needle):
    with pytest.raises(ValueError) as info:
        model(input_shape=[40], n_classes=10, **kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("input_shape", "n_classes", "needle"),
    [
        ([0], 10, "input_shape=[0]"),
        ([40], 0, "n_classes=0"),
        ([40.0], 10, "input_shape=[40.0]"),
        ([40], True, "n_classes=True"),
    ],
)
@pytest.mark.parametrize("model", [MLP, CNN])
def test_bad_sizes_are_rejected(model, input_shape, n_classes, needle):
    options = {"hidden": [8], "residual": False} if model is MLP else {"channels": 4}
    with pytest.raises(ValueError, match="must be") as info:
        model(input_shape=input_shape, n_classes=n_classes, **options)
    assert needle in str(info.value)


def test_cnn_rejects_too_short_input():
    with pytest.raises(ValueError, match=r"input_shape=\[2\] is too short"):
        cnn(input_dim=2)


# The workloads' models: the mnist1d paper's GRU, a 2-d CNN for small images, a causal transformer.


def gru(hidden=6, bidirectional=True, input_shape=(40,), n_classes=10):
    return GRU(
        input_shape=list(input_shape),
        n_classes=n_classes,
        hidden=hidden,
        bidirectional=bidirectional,
    )


def transformer(context=16, vocabulary=11, width=32, layers=2, heads=4, dropout=0.0):
    return Transformer(
        input_shape=[context],
        n_classes=vocabulary,
        width=width,
        layers=layers,
        heads=heads,
        dropout=dropout,
    )


def test_gru_is_the_papers_grubase_with_its_5134_parameters():
    assert n_params(gru()) == 5134  # the paper's notebook prints this count
    assert gru().rnn.hidden_size == 6 and gru().rnn.bidirectional
    # per direction: 3 gates x (input weights 1 + recurrent 6 + two biases) x 6 units
    assert n_params(gru(bidirectional=False)) == 3 * 6 * (1 + 6 + 2) + 40 * 6 * 10 + 10


def test_gru_reads_one_value_per_step_and_classifies_every_steps_output():
    """The paper's forward: x.view(N, T, 1), zero initial state, every step's output of both
    directions flattened into the linear head."""
    torch.manual_seed(0)
    model = gru()
    x = torch.randn(3, 40)
    outputs, _ = model.rnn(x.reshape(3, 40, 1), torch.zeros(2, 3, 6))
    assert outputs.shape == (3, 40, 12)
    torch.testing.assert_close(model(x), linear(model.head, outputs.reshape(3, 480)))


def test_gru_takes_channels_from_a_two_dimensional_input_shape():
    model = gru(input_shape=(3, 40))
    assert model.rnn.input_size == 3
    x = torch.randn(2, 3, 40)
    outputs, _ = model.rnn(x.transpose(1, 2))
    torch.testing.assert_close(model(x), linear(model.head, outputs.reshape(2, -1)))


def test_cnn2d_shapes_and_parameter_count():
    model = CNN2d(input_shape=[1, 8, 8], n_classes=10, channels=[16, 32])
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    convs = (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32)
    assert n_params(model) == convs + 32 * 4 * 4 * 10 + 10  # 8x8 -> pooled 4x4


def test_cnn2d_is_convolutions_then_one_pool_then_the_head():
    torch.manual_seed(0)
    model = CNN2d(input_shape=[8, 6], n_classes=3, channels=[4, 5])  # (H, W): one channel
    c1, c2 = model.convs
    x = torch.randn(2, 8, 6)
    h = torch.relu(torch.conv2d(x[:, None], c1.weight, c1.bias, padding=1))
    h = torch.relu(torch.conv2d(h, c2.weight, c2.bias, padding=1))
    h = torch.max_pool2d(h, 2)
    assert h.shape == (2, 5, 4, 3)
    torch.testing.assert_close(model(x), linear(model.head, h.reshape(2, -1)))


def test_transformer_returns_logits_for_every_position():
    model = transformer()
    tokens = torch.randint(0, 11, (3, 16))
    assert model(tokens).shape == (3, 16, 11)
    assert model(tokens[:, :5]).shape == (3, 5, 11)  # shorter than the context is fine
    with pytest.raises(ValueError, match="17 tokens is longer than the context 16"):
        model(torch.randint(0, 11, (3, 17)))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_transformer_is_causal(dropout):
    """The logits at position t depend on the tokens at positions <= t only (in eval mode, where
    dropout is off), and they do depend on the token at t."""
    torch.manual_seed(0)
    model = transformer(dropout=dropout).eval()
    tokens = torch.randint(0, 11, (4, 16))
    with torch.no_grad():
        reference = model(tokens)
        for t in (0, 5, 14):
            changed = tokens.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(15 - t)) % 11
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], reference[:, : t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t + 1 :], reference[:, t + 1 :])
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % 11
            assert not torch.allclose(model(changed)[:, t], reference[:, t])


def test_transformer_parameter_names_and_count():
    model = transformer(context=16, vocabulary=11, width=32, layers=2)
    names = [name for name, _ in model.named_parameters()]
    block = [
        "norm1.weight",
        "norm1.bias",
        "attention.qkv.weight",
        "attention.qkv.bias",
        "attention.proj.weight",
        "attention.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "feed_forward.fc.weight",
        "feed_forward.fc.bias",
        "feed_forward.proj.weight",
        "feed_forward.proj.bias",
    ]
    assert names == [
        "token_embedding.weight",
        "position_embedding.weight",
        *(f"blocks.{i}.{name}" for i in range(2) for name in block),
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    ]
    d = 32
    per_block = (
        2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    )
    assert n_params(model) == 11 * d + 16 * d + 2 * per_block + 2 * d + (d * 11 + 11)


def test_transformer_starts_with_small_weights_and_scaled_residual_projections():
    torch.manual_seed(0)
    model = transformer(width=64, layers=8)
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    proj = torch.cat([b.feed_forward.proj.weight.flatten() for b in model.blocks])
    assert proj.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1 / sqrt(2 * 8)
    assert all(not b.attention.qkv.bias.any() for b in model.blocks)


def test_workload_models_have_stable_parameter_names():
    assert [name for name, _ in gru().named_parameters()] == [
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "rnn.bias_ih_l0",
        "rnn.bias_hh_l0",
        "rnn.weight_ih_l0_reverse",
        "rnn.weight_hh_l0_reverse",
        "rnn.bias_ih_l0_reverse",
        "rnn.bias_hh_l0_reverse",
        "head.weight",
        "head.bias",
    ]
    model = CNN2d(input_shape=[1, 8, 8], n_classes=10, channels=[16, 32])
    assert [name for name, _ in model.named_parameters()] == [
        "convs.0.weight",
        "convs.0.bias",
        "convs.1.weight",
        "convs.1.bias",
        "head.weight",
        "head.bias",
    ]


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: gru(hidden=0), "model.hidden=0 is invalid"),
        (lambda: gru(bidirectional="yes"), "model.bidirectional='yes' is invalid"),
        (lambda: gru(input_shape=(1, 8, 8)), "input_shape=[1, 8, 8] is invalid"),
        (lambda: CNN2d([1, 8, 8], 10, channels=[]), "model.channels=[] is invalid"),
        (lambda: CNN2d([1, 8, 8], 10, channels=[16, 0]), "model.channels=[16, 0] is invalid"),
        (lambda: CNN2d([40], 10, channels=[4]), "input_shape=[40] is invalid"),
        (lambda: CNN2d([1, 1, 8], 10, channels=[4]), "is too small for a 2x2 pool"),
        (lambda: transformer(heads=5), "model.heads=5 is invalid: must divide model.width=32"),
        (lambda: transformer(width=0), "model.width=0 is invalid"),
        (lambda: transformer(layers=0), "model.layers=0 is invalid"),
        (lambda: transformer(dropout=1.0), "model.dropout=1.0 is invalid: must be a number in"),
        (lambda: transformer(dropout=-0.1), "model.dropout=-0.1 is invalid"),
        (lambda: Transformer([1, 16], 11, 32, 2, 4, 0.0), "must be (context,) of token ids"),
    ],
)
def test_workload_models_refuse_bad_options_naming_them(build, needle):
    with pytest.raises(ValueError) as info:
        build()
    assert needle in str(info.value)
