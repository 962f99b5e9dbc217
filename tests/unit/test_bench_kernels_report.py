"""The kernel benchmark's report (tools/bench/kernels_cuda.py): ratios and the issue's targets
computed from measured times. Pure arithmetic, so it runs without a GPU; the measuring half
runs in tools/gpu_check.sh."""

from __future__ import annotations

from tools.bench.kernels_cuda import Row, report

GB = 10**9


def row(block_tokens: int, kernel_s: float, per_block_s: float | None) -> Row:
    return Row(
        direction="device -> pinned host (gather)" if per_block_s else "device -> device (gather)",
        block_tokens=block_tokens,
        blocks=4096 // block_tokens,
        num_bytes=GB,
        kernel_s=kernel_s,
        alone_s=0.5 * kernel_s,
        contiguous_s=0.9 * kernel_s,
        per_block_s=per_block_s,
        torch_s=2 * kernel_s,
        host_s=0.25 * kernel_s,
    )


def test_ratios_and_targets_come_from_the_times() -> None:
    lines = report([row(16, 0.1, 0.6), row(16, 0.1, None), row(64, 0.1, 0.2)])
    gather = lines[2].split(" | ")
    assert gather[3:8] == ["10.0", "20.0", "11.1", "1.7", "5.0"]  # GB/s: kernel, alone, contiguous, loop, torch
    assert gather[8:13] == ["0.90x", "1.80x", "6.00x", "2.00x", "25000 (25%) |"]  # host us, share of the call
    device_row = lines[3].split(" | ")
    assert device_row[6] == "" and device_row[10] == ""  # no per-block reference device to device
    targets = [line for line in lines if line.startswith("- ")]
    assert targets == [  # 16-token blocks over PCIe only
        "- device -> pinned host (gather): 0.90x one cudaMemcpy [>= 0.85x: PASS], "
        "6.00x per-block cudaMemcpyAsync [>= 5x: PASS]"
    ]


def test_a_missed_target_says_fail() -> None:
    (target,) = [line for line in report([row(16, 0.2, 0.3)]) if line.startswith("- ")]
    assert "0.90x one cudaMemcpy [>= 0.85x: PASS]" in target
    assert "1.50x per-block cudaMemcpyAsync [>= 5x: FAIL]" in target


def test_the_staged_path_gets_its_own_table_and_target_line() -> None:
    staged = Row(
        direction="pinned host -> device (scatter)",
        block_tokens=16,
        blocks=256,
        num_bytes=GB,
        kernel_s=0.1,
        alone_s=0.09,
        contiguous_s=0.09,
        per_block_s=0.5,
        torch_s=0.2,
        staged_s=0.095,
    )
    lines = report([staged, row(16, 0.1, 0.6)])
    table = lines[
        lines.index("| direction | block tokens | staged GB/s | staged / contiguous | staged / per-block |") :
    ]
    assert table[2] == "| pinned host -> device (scatter) | 16 | 10.5 | 0.95x | 5.26x |"
    assert len([line for line in table if line.startswith("| ")]) == 2  # the other row was not staged
    assert (
        "- pinned host -> device (scatter), staged: 0.95x one cudaMemcpy [>= 0.85x: PASS], "
        "5.26x per-block cudaMemcpyAsync [>= 5x: PASS]"
    ) in lines
