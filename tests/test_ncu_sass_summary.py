"""bench/ncu_sass_summary.py reads Nsight Compute's source-page CSV (the tool behind the
instruction mixes in bench/results/quantized_matmul.md)."""

from bench import ncu_sass_summary

# Two preamble lines, then the header and three instructions, as `ncu --page source --csv
# --print-source sass` writes them (columns trimmed to the ones the summary reads).
SOURCE_PAGE = '''"Kernel Name","k",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","x","y","stall_barrier","stall_long_sb","stall_barrier (Not Issued)"
"0x10","      I2FP.F32.S32 R1, R2","30","1,000","0","0","10","20","0"
"0x20","      @!P0 FFMA R1, R1, R3, R4","10","1,000","0","0","0","10","0"
"0x30","      WARPGROUP.DEPBAR.LE gsb0, 0x0","60","2,000","0","0","60","0","0"
'''


def test_summary_counts_opcodes_and_loop_bodies(tmp_path):
  path = tmp_path / "sass.csv"
  path.write_text(SOURCE_PAGE)
  assert ncu_sass_summary.opcode("@!P0 IGMMA.64x128x32.S8.S8 R24, R88") == "IGMMA"
  text = ncu_sass_summary.summarize(str(path), top=5)
  lines = text.splitlines()
  assert lines[0] == "3 instructions, 4000 executed, 100 stall samples"
  mix = {line.split()[0]: line.split()[1:] for line in lines[3:6]}
  assert mix["WARPGROUP"] == ["50.00%", "60.00%"]
  assert mix["I2FP"] == ["25.00%", "30.00%"] and mix["FFMA"] == ["25.00%", "10.00%"]
  bodies = [line for line in lines if line.startswith("  ran ")]
  # The loop run 1000 times: two instructions, 40 samples, long-scoreboard stalls mostly.
  assert bodies[0].startswith("  ran 1000x: 2 instructions, 40.0% of samples; 1 I2FP, 1 FFMA")
  assert "long_sb 75%" in bodies[0] and bodies[1].startswith("  ran 2000x: 1 instructions")
