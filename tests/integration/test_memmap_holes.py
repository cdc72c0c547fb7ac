"""A RAM map with a hole (images/memmaps.toml hole32M): stage 1's /proc/iomem loses the hole, kexec's
locate_hole places around it, and the oracle, fed the same MEMORY RANGES, must agree with the emulator."""

HOLE = (0x42000000, 0x43000000)  # virt: RAM base 0x40000000 + 32M, 16M long
MiB = 1 << 20


def _system_ram(iomem: str) -> list[tuple[int, int]]:
    ranges = []
    for line in iomem.splitlines():
        if line.endswith(": System RAM") and not line.startswith(" "):
            lo, hi = line.split(" : ")[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16) + 1))
    return ranges


def test_hole_moves_a_large_initrd_out_of_the_decompressors_way(run_kexec_case, tmp_path):
    result = run_kexec_case("virt", str(512 * MiB), memmap="hole32M", initrd_size=32 * MiB, observe=True)
    iomem = (tmp_path / "case" / "iomem.txt").read_text()
    assert _system_ram(iomem) == [(0x40000000, HOLE[0]), (HOLE[1], 0x60000000)], iomem
    assert [tuple(r) for r in result.load["memory_ranges"]] == [(0x40000000, HOLE[0]), (HOLE[1], 0x60000000)]
    initrd = result.load["initrd"]["address"]
    assert initrd >= HOLE[1], hex(initrd)  # 32 MiB does not fit between the kernel's guess and the hole
    assert result.verdict.verdict == "pass", result.verdict.reasons
    assert result.predicted["verdict"] == "safe"
    assert result.oracle["agrees"], result.oracle


def test_small_initrd_below_the_hole_is_still_hit(run_kexec_case):
    result = run_kexec_case("virt", str(512 * MiB), memmap="hole32M", initrd_size=1 * MiB, observe=True)
    assert result.load["initrd"]["address"] + MiB <= HOLE[0]
    assert result.verdict.verdict == "fail", result.verdict.reasons
    assert {c["segment"] for c in result.observed["clobbered"]} >= {"initrd"}
    assert result.predicted["verdict"] == "collision"
    assert result.oracle["agrees"], result.oracle
