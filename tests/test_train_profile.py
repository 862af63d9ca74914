"""bench/train_profile.py: kernel names map to the right kind, and a CPU profile of the tiny variant
accounts for its step: every kind's share sums to one, and matmuls and the loss are seen."""
import json

import pytest

from helpers import load_script


@pytest.fixture(scope="module")
def train_profile():
    return load_script("bench/train_profile.py")


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", "matmul"),
    ("void flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x64x64_4x1x1_kernel0_0", "attention"),
    ("triton_red_fused__log_softmax_nll_loss_forward_3", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"),
    ("triton_poi_fused_add_mul_rsqrt_0", "other"),
    ("triton_poi_fused__to_copy_add_mul_1", "other"),
    # an FP8 cast that inductor names after the scaled matmul it feeds, and a matmul template
    ("triton_poi_fused__fused_rms_norm__scaled_mm__to_copy_clamp_clone_mul_reciprocal_t_view_2", "other"),
    ("triton_tem_fused_mm_0", "matmul"),
])
def test_kernel_kinds(train_profile, name, kind):
    assert train_profile.kind(name) == kind


def test_cpu_profile_of_the_tiny_variant(train_profile, tmp_path, one_thread):
    out = tmp_path / "profile.json"
    rec = train_profile.main(["tiny-cpu", "--steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == [rec]
    assert sum(k["share"] for k in rec["kinds"].values()) == pytest.approx(1, abs=1e-3)
    assert rec["kinds"]["matmul"]["share"] > 0.05 and rec["kinds"]["loss"]["share"] > 0.01
    assert rec["time_per_step_ms"] > 0 and rec["top"][0]["ms_per_step"] >= rec["top"][-1]["ms_per_step"]
