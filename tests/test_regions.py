"""Region forwards equal the same region of the whole forward; tiles, CBAM statistics, noise fields and gradients."""

import copy
import math

import pytest
import torch

from consingan.nn import ChannelAttention, fast_conv
from consingan.singan import regions as R
from consingan.singan.models import GrowingGenerator

SHAPES = {2: [(12, 10), (17, 14), (24, 20)], 3: [(7, 8, 6), (10, 11, 8), (14, 15, 11)]}
CASES = [(2, padding, up, cbam) for padding in (0, 1) for up in ("linear", "cubic") for cbam in (False, True)]
CASES += [(3, padding, "linear", cbam) for padding in (0, 1) for cbam in (False, True)]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(dims, padding=1, upsampling="linear", cbam=True, stages=3, dtype=torch.float64, channels=6,
         coordinates=False):
    """A small generator whose signals are O(1) at every stage (the DCGAN init would make them vanish, and with them
    any difference a wrong region could make)."""
    torch.manual_seed(0)
    generator = GrowingGenerator(dims, 2, num_feature_channels=channels, num_layers=2, padding=padding, cbam=cbam,
                                 upsampling=upsampling, coordinates=coordinates)
    for _ in range(stages - 1):
        generator.add_stage()
    generator = generator.to(dtype)
    with torch.no_grad():
        for p in generator.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            else:
                p.normal_(0.0, 0.1)
        generator.noise_amps.copy_(torch.tensor([1.0, 0.6, 0.8][:stages]))
    return generator


def whole_noise(generator, shapes, seed=1):
    dtype = generator.noise_amps.dtype
    return [n.to(dtype) for n in generator.sample_noise(shapes, generator=torch.Generator().manual_seed(seed))]


def boxes_of(shape):
    """Corners, a far corner, an interior box, an edge strip and the whole grid."""
    return [
        tuple((0, 4) for _ in shape),
        tuple((n - 5, n) for n in shape),
        tuple((n // 2 - 2, n // 2 + 3) for n in shape),
        ((0, shape[0]),) + tuple((n // 2 - 1, n // 2 + 2) for n in shape[1:]),
        R.whole_box(shape),
    ]


def assert_regions_and_tiles_equal_the_whole(generator, source, noise, shapes):
    """Region forwards (CBAM-free generators) over ``boxes_of`` and tiled generation equal the whole forward, which
    is returned."""
    whole = generator(noise)
    for box in boxes_of(shapes[-1]):
        region = R.region_forward(generator, source, box)
        assert torch.allclose(region, whole[R.box_slices(box)], rtol=0, atol=1e-10), box
    field = R.NoiseField.for_generator(generator, shapes, seed=7, chunk=5)
    tiled = R.generate_tiled(generator, field, tile=(6, 7, 5)[:len(shapes[-1])])
    assert torch.allclose(tiled, generator(field.whole_noise()), rtol=0, atol=1e-10)
    return whole


def grads(generator, loss):
    generator.zero_grad(set_to_none=True)
    loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in generator.named_parameters()}


@pytest.mark.parametrize("dims,padding,upsampling,cbam", CASES)
def test_region_equals_the_whole_forward_in_that_region(dims, padding, upsampling, cbam):
    generator = make(dims, padding, upsampling, cbam)
    shapes = SHAPES[dims]
    noise = whole_noise(generator, shapes)
    with torch.no_grad():
        whole = generator(noise)
        source = R.TensorNoise(generator, noise)
        descriptors = R.cbam_statistics(generator, source, tile=5) if cbam else None
        for box in boxes_of(shapes[-1]):
            region = R.region_forward(generator, source, box, descriptors=descriptors)
            assert region.shape == whole[R.box_slices(box)].shape
            assert torch.allclose(region, whole[R.box_slices(box)], rtol=0, atol=1e-10), box
        # Fewer stages: the box is then in the output grid of the last stage used.
        two = generator(noise[:2], num_stages=2)
        box = ((3, 9),) + tuple((2, 7) for _ in shapes[1][1:])
        region = R.region_forward(generator, source, box, num_stages=2, descriptors=descriptors)
        assert torch.allclose(region, two[R.box_slices(box)], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dims,padding", [(2, 0), (2, 1), (3, 0), (3, 1)])
def test_with_coordinates_a_region_and_tiles_equal_the_whole_forward(dims, padding):
    """Stage 0's coordinate channels are those of the box's place in the whole grid: region forwards (their
    gradients into stage 0 too) and tiled generation give the whole forward, and the channels change the output."""
    generator = make(dims, padding, cbam=False, coordinates=True)
    shapes = SHAPES[dims]
    noise = whole_noise(generator, shapes)
    source = R.TensorNoise(generator, noise)
    with torch.no_grad():
        whole = assert_regions_and_tiles_equal_the_whole(generator, source, noise, shapes)
        blind = copy.deepcopy(generator)
        blind.coordinates = False
        head = blind.head[1].conv
        head.weight = torch.nn.Parameter(head.weight[:, :2].clone())  # the same weights without the coordinates
        assert not torch.allclose(blind(noise), whole, atol=1e-3)
    box = boxes_of(shapes[-1])[1]
    weights = torch.randn(whole[R.box_slices(box)].shape, dtype=torch.float64)
    reference = grads(generator, (generator(noise)[R.box_slices(box)] * weights).sum())
    result = grads(generator, (R.region_forward(generator, source, box) * weights).sum())
    assert reference["head.1.conv.weight"].abs().max() > 0
    for name in reference:
        assert torch.allclose(result[name], reference[name], rtol=0, atol=1e-10), name


@pytest.mark.parametrize("dims,padding,coordinates", [(2, 0, False), (2, 1, True), (3, 0, True), (3, 1, False)])
def test_an_anchored_generator_regions_tiles_and_gradients_equal_the_whole_forward(dims, padding, coordinates):
    """With ``set_anchor`` stage 0's input is the anchor plus its scaled noise: a region adds the anchor's box, so
    region forwards, tiles and gradients give the whole forward, and the anchor changes the output."""
    generator = make(dims, padding, cbam=False, coordinates=coordinates)
    shapes = SHAPES[dims]
    free = copy.deepcopy(generator)
    anchor = torch.randn(1, 2, *shapes[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    generator.set_anchor(anchor, 0.25)
    assert generator.noise_amps[0].item() == 0.25
    assert torch.equal(generator.reconstruction_noise(0), torch.zeros_like(anchor))
    noise = whole_noise(generator, shapes)
    source = R.TensorNoise(generator, noise)
    with torch.no_grad():
        whole = assert_regions_and_tiles_equal_the_whole(generator, source, noise, shapes)
        # The anchored forward is the free generator's forward from the anchor plus the scaled noise.
        free.noise_amps[0] = 1.0
        assert torch.allclose(whole, free([anchor + 0.25 * noise[0], *noise[1:]]), rtol=0, atol=1e-10)
        # An injected image comes back through noise_for_input.
        image = torch.randn_like(anchor)
        injected = generator([generator.noise_for_input(image), *noise[1:]])
        assert torch.allclose(injected, free([image, *noise[1:]]), rtol=0, atol=1e-10)
    box = boxes_of(shapes[-1])[2]
    weights = torch.randn(whole[R.box_slices(box)].shape, dtype=torch.float64)
    reference = grads(generator, (generator(noise)[R.box_slices(box)] * weights).sum())
    result = grads(generator, (R.region_forward(generator, source, box) * weights).sum())
    for name in reference:
        if reference[name] is not None:
            assert torch.allclose(result[name], reference[name], rtol=0, atol=1e-10), name


@pytest.mark.parametrize("dims,padding,coordinates", [(2, 1, True), (3, 0, False), (3, 1, True)])
def test_a_warped_anchor_keeps_regions_tiles_and_gradients_exact_and_the_reconstruction_undeformed(dims, padding,
                                                                                                   coordinates):
    """``set_anchor(..., warp)`` deforms the anchor by a displacement drawn from all of stage 0's noise, so a region
    draws stage 0's whole grid and crops it: region forwards (also with no stage kept whole), tiles and gradients
    still give the whole forward; zero noise (the reconstruction) leaves the anchor as it is, and random noise
    changes the output against the unwarped anchor."""
    generator = make(dims, padding, cbam=False, coordinates=coordinates)
    shapes = SHAPES[dims]
    anchor = torch.randn(1, 2, *shapes[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plain = copy.deepcopy(generator)
    plain.set_anchor(anchor, 0.25)
    generator.set_anchor(anchor, 0.25, warp=1.5)
    assert generator.head_needs_whole_noise and not plain.head_needs_whole_noise
    noise = whole_noise(generator, shapes)
    source = R.TensorNoise(generator, noise)
    with torch.no_grad():
        whole = assert_regions_and_tiles_equal_the_whole(generator, source, noise, shapes)
        field = R.NoiseField.for_generator(generator, shapes, seed=7, chunk=5)
        uncached = R.generate_tiled(generator, field, tile=(6, 7, 5)[:dims], cache_bytes=0)
        assert torch.allclose(uncached, generator(field.whole_noise()), rtol=0, atol=1e-10)
        assert not torch.allclose(whole, plain(noise), atol=1e-3)
        reconstruction = [generator.reconstruction_noise(0), *noise[1:]]
        assert torch.allclose(generator(reconstruction), plain(reconstruction), rtol=0, atol=1e-6)
        with generator.undeformed_anchor():  # what injection uses: the anchor plus the noise, undeformed
            assert not generator.head_needs_whole_noise
            assert torch.allclose(generator(noise), plain(noise), rtol=0, atol=1e-10)
    box = boxes_of(shapes[-1])[2]
    weights = torch.randn(whole[R.box_slices(box)].shape, dtype=torch.float64)
    reference = grads(generator, (generator(noise)[R.box_slices(box)] * weights).sum())
    result = grads(generator, (R.region_forward(generator, source, box) * weights).sum())
    for name in reference:
        if reference[name] is not None:
            assert torch.allclose(result[name], reference[name], rtol=0, atol=1e-10), name


@pytest.mark.parametrize("dims,padding", [(2, 0), (2, 1), (3, 0), (3, 1)])
def test_region_equals_the_whole_forward_in_float32(dims, padding):
    """float32 takes the oneDNN convolutions in 3D and PyTorch's float32 interpolation weights."""
    generator = make(dims, padding, cbam=True, dtype=torch.float32)
    shapes = SHAPES[dims]
    noise = whole_noise(generator, shapes)
    with torch.no_grad():
        whole = generator(noise)
        source = R.TensorNoise(generator, noise)
        descriptors = R.cbam_statistics(generator, source, tile=6)
        for box in boxes_of(shapes[-1])[:3]:
            region = R.region_forward(generator, source, box, descriptors=descriptors)
            assert torch.allclose(region, whole[R.box_slices(box)], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dims,padding", [(2, 0), (3, 1)])
def test_cbam_statistics_equal_the_whole_forwards_pooling(dims, padding):
    generator = make(dims, padding, cbam=True)
    shapes = SHAPES[dims]
    noise = whole_noise(generator, shapes)
    seen = []
    hooks = [generator.body[k].cbam.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
             for k in range(3)]
    with torch.no_grad():
        generator(noise)
    for hook in hooks:
        hook.remove()
    descriptors = R.cbam_statistics(generator, R.TensorNoise(generator, noise), tile=4)
    spatial = tuple(range(2, 2 + dims))
    for k, features in enumerate(seen):
        average, maximum = descriptors[k]
        assert torch.allclose(average, features.mean(spatial, keepdim=True), rtol=0, atol=1e-12)
        assert torch.allclose(maximum, features.amax(spatial, keepdim=True), rtol=0, atol=1e-12)
    # Without CBAM there is nothing to pool.
    assert R.cbam_statistics(make(dims, padding, cbam=False), R.TensorNoise(generator, noise), tile=4) == [None] * 3


@pytest.mark.parametrize("dims", [2, 3])
def test_region_pooling_differs_from_exact_only_through_cbam(dims):
    shapes = SHAPES[dims]
    box = boxes_of(shapes[-1])[2]
    # Without CBAM both rules are the whole forward.
    plain = make(dims, padding=1, cbam=False)
    noise = whole_noise(plain, shapes)
    with torch.no_grad():
        expected = plain(noise)[R.box_slices(box)]
        region = R.region_forward(plain, R.TensorNoise(plain, noise), box, descriptors="region")
    assert torch.allclose(region, expected, rtol=0, atol=1e-10)
    # With CBAM: pooling over the whole grid is the whole forward; over a patch it is not.
    generator = make(dims, padding=1, cbam=True)
    source = R.TensorNoise(generator, noise)
    with torch.no_grad():
        whole = generator(noise)
        everything = R.region_forward(generator, source, R.whole_box(shapes[-1]), descriptors="region")
        pooled = R.region_forward(generator, source, box, descriptors="region")
        exact = R.region_forward(generator, source, box, descriptors=R.cbam_statistics(generator, source, tile=5))
    assert torch.allclose(everything, whole, rtol=0, atol=1e-10)
    assert torch.allclose(exact, whole[R.box_slices(box)], rtol=0, atol=1e-10)
    assert (pooled - exact).abs().max() > 1e-4


@pytest.mark.parametrize("dims", [2, 3])
def test_region_pooling_pools_over_the_features_the_region_materialises(dims):
    """One stage: 'region' equals fixed descriptors taken from the whole forward's pre-CBAM features over the plan's
    CBAM input box."""
    generator = make(dims, padding=1, cbam=True, stages=1)
    shapes = SHAPES[dims][-1:]
    noise = whole_noise(generator, shapes)
    seen = []
    hook = generator.body[0].cbam.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        generator(noise)
    hook.remove()
    box = tuple((n - 4, n) for n in shapes[0])
    cbam_box = R.region_plan(generator, shapes, box)[0].cbam_input
    assert cbam_box != R.whole_box(shapes[0])
    part = seen[0][R.box_slices(cbam_box)]
    spatial = tuple(range(2, 2 + dims))
    fixed = [(part.mean(spatial, keepdim=True), part.amax(spatial, keepdim=True))]
    source = R.TensorNoise(generator, noise)
    with torch.no_grad():
        pooled = R.region_forward(generator, source, box, descriptors="region")
        expected = R.region_forward(generator, source, box, descriptors=fixed)
    assert torch.allclose(pooled, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dims,padding", [(2, 0), (2, 1), (3, 0), (3, 1)])
def test_gradients_of_a_region_equal_those_through_the_whole_forward(dims, padding):
    """cbam=False: the region loss's gradient w.r.t. the trainable stages (1, 2 and the tail; stage 0 and the head
    frozen, as ``param_groups(active_scales=2)`` leaves them) equals the whole forward's."""
    generator = make(dims, padding, cbam=False)
    generator.param_groups(active_scales=2, lr=1e-3, lr_factor=0.1)
    shapes = SHAPES[dims]
    noise = whole_noise(generator, shapes)
    box = boxes_of(shapes[-1])[1]
    weights = torch.randn(generator(noise)[R.box_slices(box)].shape, dtype=torch.float64)
    reference = grads(generator, (generator(noise)[R.box_slices(box)] * weights).sum())
    region = R.region_forward(generator, R.TensorNoise(generator, noise), box, frozen_below=1)
    assert region.requires_grad
    result = grads(generator, (region * weights).sum())
    trainable = [name for name, p in generator.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("body.1.", "body.2.", "tail.")) for n in trainable)
    for name in trainable:
        assert reference[name].abs().max() > 0
        assert torch.allclose(result[name], reference[name], rtol=0, atol=1e-10), name


def test_frozen_stages_get_no_gradient_even_when_they_require_it():
    generator = make(2, padding=1, cbam=False)
    for p in generator.parameters():
        p.requires_grad_(True)
    shapes = SHAPES[2]
    noise = whole_noise(generator, shapes)
    box = boxes_of(shapes[-1])[2]
    weights = torch.randn(1, 2, *R.box_shape(box), dtype=torch.float64)
    reference = grads(generator, (generator(noise)[R.box_slices(box)] * weights).sum())
    region = R.region_forward(generator, R.TensorNoise(generator, noise), box, frozen_below=2)
    result = grads(generator, (region * weights).sum())
    for name, grad in result.items():
        if name.startswith(("head.", "body.0.", "body.1.")):
            assert grad is None, name
        else:
            assert grad is not None and torch.allclose(grad, reference[name], rtol=0, atol=1e-10), name


@pytest.mark.parametrize("dims", [2, 3])
def test_gradients_with_cbam(dims):
    """Exact statistics: the gradient equals the whole forward's with CBAM's pooled descriptors detached (the
    statistics are constants to a region). 'region' over the whole grid: the whole forward's own gradient."""
    generator = make(dims, padding=1, cbam=True)
    generator.param_groups(active_scales=2, lr=1e-3, lr_factor=0.1)
    shapes = SHAPES[dims]
    noise = whole_noise(generator, shapes)
    source = R.TensorNoise(generator, noise)
    box = boxes_of(shapes[-1])[0]
    trainable = [name for name, p in generator.named_parameters() if p.requires_grad]

    with torch.no_grad():
        weights = torch.randn_like(generator(noise))
    plain = grads(generator, (generator(noise) * weights).sum())
    everything = grads(generator, (R.region_forward(generator, source, R.whole_box(shapes[-1]),
                                                    descriptors="region", frozen_below=1) * weights).sum())
    for name in trainable:
        assert torch.allclose(everything[name], plain[name], rtol=0, atol=1e-10), name

    part = weights[R.box_slices(box)]
    undetached = grads(generator, (generator(noise)[R.box_slices(box)] * part).sum())
    for k in range(3):
        attention: ChannelAttention = generator.body[k].cbam.channel_attention

        def detached(x, descriptor=None, module=attention, forward=attention.forward):
            return forward(x, descriptor=(module.avg_pool(x).detach(), module.max_pool(x).detach()))
        attention.forward = detached
    reference = grads(generator, (generator(noise)[R.box_slices(box)] * part).sum())
    for k in range(3):
        del generator.body[k].cbam.channel_attention.forward  # back to the class's method
    descriptors = R.cbam_statistics(generator, source, tile=5)
    result = grads(generator, (R.region_forward(generator, source, box, descriptors=descriptors,
                                                frozen_below=1) * part).sum())
    for name in trainable:
        assert torch.allclose(result[name], reference[name], rtol=0, atol=1e-10), name
    # Detaching the statistics really changes the gradient, so the comparison above is not vacuous.
    assert any(not torch.allclose(reference[n], undetached[n], rtol=0, atol=1e-8) for n in trainable)


@pytest.mark.parametrize("dims,padding,cbam", [(2, 0, True), (2, 1, True), (2, 1, False), (3, 0, True), (3, 1, True)])
def test_tiled_generation_with_a_noise_field_equals_the_untiled_forward(dims, padding, cbam):
    generator = make(dims, padding, cbam=cbam)
    shapes = SHAPES[dims]
    field = R.NoiseField.for_generator(generator, shapes, seed=7, batch_size=2, chunk=5)
    with torch.no_grad():
        whole = generator(field.whole_noise())
    tiled = R.generate_tiled(generator, field, tile=(6, 7, 5)[:dims])
    assert tiled.shape == whole.shape == (2, 2, *shapes[-1])
    assert torch.allclose(tiled, whole, rtol=0, atol=1e-10)
    assert not torch.allclose(tiled[0], tiled[1], atol=1e-3)  # the batch's samples differ


MODES = [("region",) * 3, ("whole", "region", "region"), ("tiles", "region", "region"), ("whole", "whole", "region"),
         ("whole", "tiles", "region"), ("tiles", "tiles", "region")]


@pytest.mark.parametrize("dims,padding", [(2, 0), (2, 1), (3, 1)])
def test_coarse_stages_kept_whole_in_one_piece_or_in_tiles_give_the_whole_forward(dims, padding, monkeypatch):
    """Every way of keeping the coarse stages (each computed once, whole or tile by tile; the stages above per tile
    of the output) gives the untiled output and CBAM's exact statistics."""
    generator = make(dims, padding, cbam=True)
    shapes = SHAPES[dims]
    field = R.NoiseField.for_generator(generator, shapes, seed=7, batch_size=2, chunk=5)
    seen = []
    hooks = [generator.body[k].cbam.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for k in range(3)]
    with torch.no_grad():
        whole = generator(field.whole_noise())
    for hook in hooks:
        hook.remove()
    spatial = tuple(range(2, 2 + dims))
    for modes in MODES:
        monkeypatch.setattr(R, "_cache_modes", lambda *args, modes=modes: list(modes))
        tiled = R.generate_tiled(generator, field, tile=(6, 5, 4)[:dims], statistics_tile=4, cache_bytes=1)
        assert torch.allclose(tiled, whole, rtol=0, atol=1e-10), modes
        descriptors = R.cbam_statistics(generator, field, tile=4, cache_bytes=1)
        for k, features in enumerate(seen):
            assert torch.allclose(descriptors[k][0], features.mean(spatial, keepdim=True), rtol=0, atol=1e-12)
            assert torch.allclose(descriptors[k][1], features.amax(spatial, keepdim=True), rtol=0, atol=1e-12)


def test_which_stages_are_kept_whole_follows_the_memory_given():
    generator = make(3, padding=1, cbam=True, dtype=torch.float32, channels=8)
    shapes = [(20, 20, 20), (40, 40, 40), (80, 80, 80)]
    layout = R._Layout(generator, shapes, None)
    item = 2 * 8 * 4  # batch 2, 8 channels, float32
    maps = R.WHOLE_STAGE_MAPS

    def modes(budget):
        return R._cache_modes(generator, layout, 2, 10, budget)

    assert modes(0) == ["region"] * 3 and modes(10**12) == ["whole", "whole", "region"]  # the last always per tile
    both_whole = item * (20**3 + maps * 40**3)  # stage 0's output held while stage 1 runs in one piece
    assert modes(both_whole) == ["whole", "whole", "region"]
    assert modes(both_whole - 1) == ["whole", "tiles", "region"]  # stage 1 in tiles, its output kept
    margin = R.receptive_margins(generator)[1]
    stage1_tiles = item * (20**3 + 40**3 + maps * (10 + 2 * margin + 2) ** 3)
    assert modes(stage1_tiles) == ["whole", "tiles", "region"] and modes(stage1_tiles - 1) == ["whole", "region",
                                                                                              "region"]


def test_noise_field_cache_returns_the_same_values_and_stays_within_its_bytes(monkeypatch):
    shape = (30, 26, 20)
    chunk_bytes = 4 * 6**3 * 4
    boxes = [tuple((max(0, a - 3), min(n, b + 3)) for (a, b), n in zip(box, shape)) for box in R.tiles(shape, 8)]
    draws = []
    original = R._chunk_noise
    monkeypatch.setattr(R, "_chunk_noise", lambda *args: draws.append(args[3]) or original(*args))
    results = {}
    for cache in (0, 200 * chunk_bytes):
        field = R.NoiseField(seed=5, channels=[4], noise_shapes=[shape], chunk=6, cache_bytes=cache)
        draws.clear()
        results[cache] = [field(0, box) for box in boxes], len(draws)
        assert field._cached <= cache and len(field._cache) <= 200
    (plain, uncached_draws), (cached, cached_draws) = results[0], results[200 * chunk_bytes]
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert cached_draws < 0.6 * uncached_draws  # overlapping boxes in raster order reuse their neighbours' chunks
    whole = R.NoiseField(seed=5, channels=[4], noise_shapes=[shape], chunk=6).whole(0)
    assert all(torch.equal(part, whole[R.box_slices(box)]) for part, box in zip(cached, boxes))


def test_tiled_generation_in_float32_and_on_another_device_for_the_output():
    generator = make(3, padding=1, cbam=True, dtype=torch.float32)
    shapes = SHAPES[3]
    field = R.NoiseField.for_generator(generator, shapes, seed=3)
    with torch.no_grad():
        whole = generator(field.whole_noise())
    tiled = R.generate_tiled(generator, field, tile=6, statistics_tile=4, device="cpu")
    assert tiled.dtype == torch.float32
    assert torch.allclose(tiled, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_noise_field_boxes_equal_the_boxes_of_its_whole_noise(dims):
    shape = (23, 18, 9)[:dims]
    field = R.NoiseField(seed=11, channels=[3], noise_shapes=[shape], batch_size=2, chunk=4, dtype=torch.float64)
    whole = field.whole(0)
    assert whole.shape == (2, 3, *shape) and whole.dtype == torch.float64
    for box in [tuple((1, 7) for _ in shape), tuple((n - 5, n) for n in shape), tuple((3, 4) for _ in shape),
                R.whole_box(shape)]:
        assert torch.equal(field(0, box), whole[R.box_slices(box)])
    assert torch.equal(R.NoiseField(11, [3], [shape], batch_size=2, chunk=4, dtype=torch.float64).whole(0), whole)
    # A voxel's value depends on its position only: not on the grid's size or the batch's.
    box = tuple((2, 6) for _ in shape)
    other = R.noise_box(11, 0, 3, tuple(n + 10 for n in shape), box, chunk=4, dtype=torch.float64)
    assert torch.equal(other[0], field(0, box)[0])
    # Seeds, stages, samples and chunks all get their own values, and they look standard normal.
    assert not torch.allclose(R.noise_box(12, 0, 3, shape, box, chunk=4, dtype=torch.float64), other)
    assert not torch.allclose(R.noise_box(11, 1, 3, shape, box, chunk=4, dtype=torch.float64), other)
    assert not torch.allclose(whole[0], whole[1])
    first = (slice(None), slice(None)) + (slice(0, 4),) * dims
    second = (slice(None), slice(None)) + (slice(4, 8),) + (slice(0, 4),) * (dims - 1)
    assert not torch.allclose(whole[first], whole[second])
    big = R.noise_box(0, 0, 4, (64,) * dims, R.whole_box((64,) * dims), chunk=16)
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1.0) < 0.05


def test_noise_field_for_a_generator_matches_its_noise_shapes():
    generator = make(2, padding=0, cbam=False)
    field = R.NoiseField.for_generator(generator, SHAPES[2], seed=0)
    noise = field.whole_noise()
    assert [tuple(n.shape) for n in noise] == [generator.noise_shape(k, s) for k, s in enumerate(SHAPES[2])]
    assert all(n.dtype == torch.float64 for n in noise)
    fresh = R.FreshNoise(generator, SHAPES[2], batch_size=3)
    assert fresh(1, ((0, 5), (2, 4))).shape == (3, 6, 5, 2)


@pytest.mark.parametrize("dims,padding,upsampling", [(2, 0, "linear"), (2, 1, "cubic"), (3, 1, "linear")])
def test_receptive_margins_bound_the_boxes_of_the_plan(dims, padding, upsampling):
    generator = make(dims, padding, upsampling, cbam=True)
    margins = R.receptive_margins(generator)
    taps = 2 if upsampling == "cubic" else 1
    # Two convolutions (1 each), CBAM (3), head or tail (1), resampling taps below the last stage.
    assert margins == [2 + 3 + 1 + taps + (taps if padding == 0 else 0), 2 + 3 + taps, 2 + 3 + 1]
    shapes = SHAPES[dims]
    box = boxes_of(shapes[-1])[2]
    plan = R.region_plan(generator, shapes, box)
    assert plan[-1].features == tuple((a - 1, b + 1) for a, b in box)  # the tail's 3-wide window
    # At the finest stage an interior box grows by exactly its margin (centred; the noise grid is body_shrink
    # larger, its centre offset by half of that).
    half = generator.body_shrink // 2
    noise_grid = [n + generator.body_shrink for n in shapes[-1]]
    assert plan[-1].noise == tuple((max(0, a - margins[-1] + half), min(n, b + margins[-1] + half))
                                   for (a, b), n in zip(box, noise_grid))
    if padding == 1:  # below it, the boxes lie within the projected box grown by the margins of the stages above
        finest = shapes[-1]
        for k in range(len(shapes)):
            for axis, (a, b) in enumerate(box):
                ratio = shapes[k][axis] / finest[axis]
                context = sum(margins[j] * shapes[k][axis] / shapes[j][axis] for j in range(k, len(shapes))) + 1
                lo, hi = (a + 0.5) * ratio - 0.5 - context, (b - 0.5) * ratio - 0.5 + context
                got = plan[k].noise[axis]
                assert got[0] >= max(0, math.floor(lo)) and got[1] <= min(shapes[k][axis], math.ceil(hi) + 1)


def test_a_region_materialises_less_than_the_whole_map():
    generator = make(3, padding=1, cbam=True)
    shapes = [(8, 8, 8), (16, 16, 16), (40, 40, 40)]
    box = ((0, 8), (16, 24), (32, 40))
    plan = R.region_plan(generator, shapes, box)
    finest = plan[-1]
    assert finest.features == ((0, 9), (15, 25), (31, 40))  # the tail's window, clipped at the borders
    assert finest.cbam_input == ((0, 12), (12, 28), (28, 40))  # CBAM's 7-wide spatial attention
    assert finest.input == ((0, 14), (10, 30), (26, 40))  # and the two convolutions
    assert math.prod(R.box_shape(finest.noise)) < 0.1 * math.prod(shapes[-1])


def test_refusals():
    generator = make(2, padding=1, cbam=True)
    shapes = SHAPES[2]
    source = R.TensorNoise(generator, whole_noise(generator, shapes))
    with pytest.raises(ValueError, match="cbam_statistics"):
        R.region_forward(generator, source, ((0, 4), (0, 4)))
    with pytest.raises(ValueError, match="inside the grid"):
        R.region_forward(generator, source, ((0, 4), (18, 21)), descriptors="region")
    with pytest.raises(ValueError, match="noise of stage"):
        R.region_forward(generator, lambda k, box: torch.zeros(1, 3, 2, 2, dtype=torch.float64), ((0, 4), (0, 4)),
                         shapes=shapes, descriptors="region")
    with pytest.raises(ValueError, match="exact CBAM statistics"):
        R.generate_tiled(generator, source, 8, descriptors="region")
    with pytest.raises(ValueError, match="shapes="):
        R.region_forward(generator, lambda k, box: None, ((0, 4), (0, 4)), descriptors="region")


@pytest.mark.parametrize("dims", [2, 3])
def test_the_hooks_in_existing_modules_keep_their_behaviour(dims):
    torch.manual_seed(0)
    attention = ChannelAttention(dims, 8, reduction=2)
    x = torch.randn(2, 8, *(6,) * dims)
    given = attention(x, descriptor=(attention.avg_pool(x), attention.max_pool(x)))
    assert torch.equal(attention(x), given)
    conv = torch.nn.Conv3d(4, 5, 3, padding=1) if dims == 3 else torch.nn.Conv2d(4, 5, 3, padding=1)
    y = torch.randn(1, 4, *(7,) * dims)
    padded = torch.nn.functional.pad(y, [1] * (2 * dims))
    assert torch.allclose(fast_conv.conv_forward(conv, padded, padding=(0,) * dims), conv(y), atol=1e-6)
