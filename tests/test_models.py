"""gradalign.models: shapes, parameter counts, the residual formula, names and option checks."""

import pytest
import torch
from omegaconf import OmegaConf

from gradalign.models.cnn import CNN
from gradalign.models.mlp import MLP


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
