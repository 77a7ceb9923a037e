"""The shared-memory registry (twinfer.sharedmem), in memory: keys, bounds,
limits, leases, unregistering a region in use, and the engine writing
outputs straight into a region."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from support import save_identity_model
from twinfer.engines.builtin import read_builtin
from twinfer.engines.openvino import OpenVINOEngine, Signature
from twinfer.errors import ErrorCode, TwinferError
from twinfer.sharedmem import SHM_DIR, SharedMemory, shm_file_name
from twinfer.wire.messages import DType, RegionInfo, RegionRef


def make_object(directory: Path, size: int) -> str:
    """A shm-like object of ``size`` zero bytes in ``directory``; returns its key."""
    name = f"twinfer-test-{uuid.uuid4().hex}"
    (directory / name).write_bytes(bytes(size))
    return "/" + name


@pytest.fixture
def shm(tmp_path: Path) -> SharedMemory:
    return SharedMemory(str(tmp_path))


def code_of(excinfo: pytest.ExceptionInfo[TwinferError]) -> ErrorCode | int:
    return excinfo.value.code


@pytest.mark.parametrize(
    "key", ["", "/", "a/b", "/a/b", "../etc/passwd", ".", "/..", "a\0b", "x" * 256, 7]
)
def test_a_key_that_is_not_a_shm_object_name_is_refused(key: object) -> None:
    with pytest.raises(TwinferError) as e:
        shm_file_name(key)
    assert code_of(e) is ErrorCode.INVALID_REGION


def test_keys_may_have_one_leading_slash() -> None:
    assert shm_file_name("/input") == shm_file_name("input") == "input"
    assert shm_file_name("x" * 255) == "x" * 255


def test_register_maps_the_object_and_status_lists_the_region(
    shm: SharedMemory, tmp_path: Path
) -> None:
    key = make_object(tmp_path, 4096)
    table = shm.table(4, 1 << 20, "connection 1")
    table.register("in", key, 1024, 64)
    assert table.status() == [RegionInfo("in", key, 1024, 64)]
    assert table.status("in") == [RegionInfo("in", key, 1024, 64)]
    assert shm.mapped == {key[1:]: 4096}


def test_an_object_is_mapped_once_for_all_its_regions_and_unmapped_with_the_last(
    shm: SharedMemory, tmp_path: Path
) -> None:
    key = make_object(tmp_path, 4096)
    a, b = shm.table(4, 1 << 20), shm.table(4, 1 << 20)
    a.register("in", key, 0, 64)
    a.register("out", key, 64, 64)
    b.register("in", key, 128, 64)
    assert list(shm.mapped) == [key[1:]]
    a.close()
    assert list(shm.mapped) == [key[1:]]
    b.unregister("in")
    assert shm.mapped == {}


def test_registration_errors_are_precise_and_map_nothing(shm: SharedMemory, tmp_path: Path) -> None:
    key = make_object(tmp_path, 100)
    table = shm.table(4, 1 << 20)
    cases = [
        (("r", "/missing", 0, 10), ErrorCode.INVALID_REGION, "no shared-memory object"),
        (("r", key, 90, 20), ErrorCode.INVALID_REGION, "beyond the 100 bytes"),
        (("r", key, 0, 0), ErrorCode.INVALID_REGION, "byte_size > 0"),
        (("r", key, -1, 10), ErrorCode.INVALID_REGION, "offset must be >= 0"),
        (("r", "/a/b", 0, 10), ErrorCode.INVALID_REGION, "not the name"),
        (("", key, 0, 10), ErrorCode.INVALID_REGION, "region name"),
    ]
    for args, code, text in cases:
        with pytest.raises(TwinferError) as e:
            table.register(*args)  # type: ignore[arg-type]
        assert code_of(e) is code and text in e.value.message, args
    assert shm.mapped == {} and len(table) == 0
    assert table.errors == {"INVALID_REGION": len(cases)}


def test_a_symlink_in_the_shm_directory_is_not_followed(shm: SharedMemory, tmp_path: Path) -> None:
    target = tmp_path / "outside"
    target.write_bytes(bytes(64))
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(TwinferError) as e:
        shm.table(4, 1 << 20).register("r", "/link", 0, 8)
    assert code_of(e) is ErrorCode.INVALID_REGION


def test_a_name_is_registered_once(shm: SharedMemory, tmp_path: Path) -> None:
    key = make_object(tmp_path, 100)
    table = shm.table(4, 1 << 20)
    table.register("r", key, 0, 10)
    with pytest.raises(TwinferError) as e:
        table.register("r", key, 10, 10)
    assert code_of(e) is ErrorCode.INVALID_REGION and "already registered" in e.value.message


def test_limits_on_regions_and_bytes(shm: SharedMemory, tmp_path: Path) -> None:
    key = make_object(tmp_path, 1000)
    table = shm.table(2, 100, "connection 9")
    table.register("a", key, 0, 60)
    with pytest.raises(TwinferError) as e:
        table.register("b", key, 0, 41)
    assert code_of(e) is ErrorCode.REGION_LIMIT and "the limit is 100" in e.value.message
    table.register("b", key, 0, 40)
    with pytest.raises(TwinferError) as e:
        table.register("c", key, 0, 1)
    assert code_of(e) is ErrorCode.REGION_LIMIT and "connection 9 already has 2" in str(e.value)
    table.unregister("a")
    table.register("c", key, 0, 1)


def test_unknown_regions_and_references_beyond_the_region(
    shm: SharedMemory, tmp_path: Path
) -> None:
    key = make_object(tmp_path, 1000)
    table = shm.table(4, 1 << 20)
    table.register("r", key, 100, 50)
    with pytest.raises(TwinferError) as e:
        table.lease(RegionRef("nope", 0, 1), "input 'x'")
    assert code_of(e) is ErrorCode.UNKNOWN_REGION and "input 'x'" in e.value.message
    with pytest.raises(TwinferError) as e:
        table.lease(RegionRef("r", 40, 11), "input 'x'")
    assert code_of(e) is ErrorCode.INVALID_REGION
    assert "offset 40 + byte_size 11 is beyond region 'r' of 50 bytes" in e.value.message
    for bad in (RegionRef("r", -1, 1), RegionRef("r", 0, -1)):
        with pytest.raises(TwinferError):
            table.lease(bad, "x")
    with pytest.raises(TwinferError) as e:
        table.unregister("nope")
    assert code_of(e) is ErrorCode.UNKNOWN_REGION and "registered: ['r']" in e.value.message
    with pytest.raises(TwinferError) as e:
        table.status("nope")
    assert code_of(e) is ErrorCode.UNKNOWN_REGION
    table.lease(RegionRef("r", 40, 10), "x").release()  # the very end is fine


def test_inputs_are_writable_zero_copy_views_of_the_object(
    shm: SharedMemory, tmp_path: Path
) -> None:
    key = make_object(tmp_path, 4096)
    table = shm.table(4, 1 << 20)
    table.register("r", key, 1024, 1024)
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    with open(tmp_path / key[1:], "r+b") as f:
        f.seek(1024 + 16)
        f.write(values.tobytes())
    lease = table.input_array(RegionRef("r", 16, 32), DType.F32, (2, 4), "input 'x'")
    np.testing.assert_array_equal(lease.array, values)
    assert lease.array.flags.writeable
    lease.array[0, 0] = 42  # the same memory as the object's
    assert np.frombuffer((tmp_path / key[1:]).read_bytes()[1040:1044], np.float32)[0] == 42
    with pytest.raises(TwinferError) as e:
        table.input_array(RegionRef("r", 16, 31), DType.F32, (2, 4), "input 'x'")
    assert code_of(e) is ErrorCode.INVALID_REGION and "takes 32 bytes" in e.value.message


def test_unregister_while_leased_frees_the_name_and_keeps_the_mapping_until_the_lease_ends(
    shm: SharedMemory, tmp_path: Path
) -> None:
    key = make_object(tmp_path, 64)
    table = shm.table(1, 1 << 20)
    table.register("r", key, 0, 64)
    lease = table.lease(RegionRef("r", 0, 64), "output 'y'")
    assert table.unregister("r") == RegionInfo("r", key, 0, 64)
    assert table.status() == [] and key[1:] in shm.mapped
    with pytest.raises(TwinferError) as e:
        table.lease(RegionRef("r", 0, 8), "input 'x'")  # no new lease on it
    assert code_of(e) is ErrorCode.UNKNOWN_REGION
    lease.bytes[:] = 7  # still mapped: the device thread may write
    table.register("r", key, 0, 32)  # the name (and the limit's slot) is free again
    table.unregister("r")
    assert key[1:] in shm.mapped
    lease.release()
    lease.release()  # a second release does nothing
    assert shm.mapped == {}
    assert (tmp_path / key[1:]).read_bytes() == bytes([7]) * 64


def test_close_releases_every_region(shm: SharedMemory, tmp_path: Path) -> None:
    keys = [make_object(tmp_path, 64) for _ in range(3)]
    table = shm.table(8, 1 << 20)
    for i, key in enumerate(keys):
        table.register(f"r{i}", key, 0, 64)
    assert len(shm.mapped) == 3
    assert [r.name for r in table.close()] == ["r0", "r1", "r2"]
    assert shm.mapped == {} and len(table) == 0


def test_the_real_dev_shm() -> None:
    name = f"twinfer-test-{uuid.uuid4().hex}"
    path = Path(SHM_DIR) / name
    path.write_bytes(bytes(128))
    try:
        shm = SharedMemory()
        table = shm.table(1, 1 << 20)
        table.register("r", "/" + name, 0, 128)
        table.lease(RegionRef("r", 0, 4), "x").bytes[:] = 1
        table.close()
        assert path.read_bytes()[:5] == b"\x01\x01\x01\x01\x00"
    finally:
        os.unlink(path)


@pytest.fixture(scope="module")
def core() -> Iterator[ov.Core]:
    yield ov.Core()


def region_bytes(tmp_path: Path, size: int) -> tuple[SharedMemory, np.ndarray, str]:
    shm = SharedMemory(str(tmp_path))
    key = make_object(tmp_path, size)
    table = shm.table(1, 1 << 20)
    table.register("out", key, 0, size)
    return shm, table.lease(RegionRef("out", 0, size), "output").bytes, key


def test_engine_copies_a_dynamic_output_into_the_region(core: ov.Core, tmp_path: Path) -> None:
    compiled = core.compile_model(read_builtin(core, "builtin:tiny"), "CPU")
    engine = OpenVINOEngine(compiled, Signature.of(compiled))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = engine.run({"x": x}, ())
    _, dest, _ = region_bytes(tmp_path, 64)
    result = engine.run({"x": x}, ("y", "label"), into={"y": dest})
    np.testing.assert_array_equal(result["y"], expected["y"])
    assert np.shares_memory(result["y"], dest)
    np.testing.assert_array_equal(dest[:24].view(np.float32).reshape(2, 3), expected["y"])
    with pytest.raises(TwinferError) as e:
        engine.run({"x": x}, (), into={"y": dest[:23]})
    assert code_of(e) is ErrorCode.INVALID_REGION and "takes 24 bytes" in e.value.message


def test_engine_has_openvino_write_a_static_output_into_the_region_then_restores_its_own(
    core: ov.Core, tmp_path: Path
) -> None:
    path = save_identity_model(tmp_path / "identity.xml", np.float32, [2, 3])
    compiled = core.compile_model(core.read_model(path), "CPU")
    engine = OpenVINOEngine(compiled, Signature.of(compiled))
    _, dest, _ = region_bytes(tmp_path, 24)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = engine.run({"x": x}, (), into={"out": dest})
    np.testing.assert_array_equal(result["out"], x)
    np.testing.assert_array_equal(dest.view(np.float32).reshape(2, 3), x)
    # The next request without a region gets its own output, and the
    # region is left alone.
    again = engine.run({"x": x + 1}, ())
    np.testing.assert_array_equal(again["out"], x + 1)
    np.testing.assert_array_equal(dest.view(np.float32).reshape(2, 3), x)
