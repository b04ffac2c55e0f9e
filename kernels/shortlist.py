"""The Triton configs a launch on each GPU architecture tunes over: per kernel function, its fixed
configs, then the next ones in its list that compile with no register spills and fit one block on an SM in every
variant (static evidence, no GPU): at most 3. COMPILE_S: how many variant rows those are per kernel and the CPU
seconds they took to compile from a cold cache, which the GPU check's plan derives its compile budget from.

Written by ``vit-fast kernels --arch sm_XX --cold --shortlist kernels/shortlist.py`` (with ``--quick``: the fixed
configs alone, a first shortlist that tunes nothing): rerun it when a kernel or its config list changes
(tests/suites/test_kernel_resources.py checks that every fixed config is listed)."""

SHORTLIST: dict[str, dict[str, list[str]]] = {'sm_80': {'_attention_bwd_delta_kernel': ['64 w4 s3'],
           '_attention_bwd_dkdv_kernel': ['32x64 w4 s2', '32x128 w8 s2', '64x64 w4 s2'],
           '_attention_bwd_dq_kernel': ['64x32 w4 s2', '64x64 w4 s2', '128x32 w8 s2'],
           '_attention_bwd_fused_kernel': ['32x64 w4 s2', '32x128 w8 s2', '64x64 w4 s2'],
           '_attention_fwd_kernel': ['64x64 w4 s2', '64x64 w4 s3', '128x64 w4 s3'],
           '_gemm_kernel': ['128x256x64 w8 s3', '256x128x64 w8 s3', '128x128x64 w8 s4'],
           '_layer_norm_bwd_kernel': ['8 w8 s3', '1 w2 s3', '1 w4 s3'],
           '_layer_norm_fwd_kernel': ['16 w8 s3', '1 w2 s3', '1 w4 s3'],
           '_patch_embed_bwd_images_kernel': ['128x128x32 w8 s3', '128x64x32 w4 s4', '64x128x32 w4 s4'],
           '_patch_embed_bwd_weight_kernel': ['128x128x32 w8 s3', '128x64x32 w4 s4', '64x128x32 w4 s4'],
           '_patch_embed_fwd_kernel': ['128x128x32 w8 s3', '128x64x32 w4 s4', '64x128x32 w4 s4']},
 'sm_90': {'_attention_bwd_delta_kernel': ['64 w4 s3'],
           '_attention_bwd_dkdv_kernel': ['32x64 w4 s2', '32x128 w8 s2', '64x64 w4 s2'],
           '_attention_bwd_dq_kernel': ['64x32 w4 s2', '64x64 w4 s2', '128x32 w8 s2'],
           '_attention_bwd_fused_kernel': ['32x64 w4 s2', '32x128 w8 s2', '64x64 w4 s2'],
           '_attention_fwd_kernel': ['64x64 w4 s2', '64x64 w4 s3', '128x64 w4 s3'],
           '_attention_fwd_tma_kernel': ['64x64 w4 s2', '64x64 w4 s3', '128x64 w4 s3'],
           '_gemm_kernel': ['128x256x64 w8 s3', '256x128x64 w8 s3', '128x128x64 w8 s4'],
           '_gemm_tma_kernel': ['128x128x64 w8 s4', '128x64x64 w4 s4', '128x128x64 w4 s4'],
           '_layer_norm_bwd_kernel': ['8 w8 s3', '1 w2 s3', '1 w4 s3'],
           '_layer_norm_fwd_kernel': ['16 w8 s3', '1 w2 s3', '1 w4 s3'],
           '_patch_embed_bwd_images_kernel': ['128x128x32 w8 s3', '128x64x32 w4 s4', '64x128x32 w4 s4'],
           '_patch_embed_bwd_weight_kernel': ['128x128x32 w8 s3', '128x64x32 w4 s4', '64x128x32 w4 s4'],
           '_patch_embed_fwd_kernel': ['128x128x32 w8 s3', '128x64x32 w4 s4', '64x128x32 w4 s4'],
           '_quantize_rows_fwd_kernel': ['1x4096 w8', '4x1024 w8'],
           '_scaled_gemm_kernel': ['128x128 w8 s3', '128x256 w8 s3', '64x128 w4 s4'],
           '_scaled_gemm_tma_kernel': ['128x128 w8 s3', '128x256 w8 s3', '64x128 w4 s4']}}

COMPILE_S: dict[str, dict[str, dict[str, float]]] = {'sm_80': {'_attention_bwd_delta_kernel': {'rows': 6, 'seconds': 15.09},
           '_attention_bwd_dkdv_kernel': {'rows': 18, 'seconds': 85.98},
           '_attention_bwd_dq_kernel': {'rows': 18, 'seconds': 125.26},
           '_attention_bwd_fused_kernel': {'rows': 18, 'seconds': 143.53},
           '_attention_fwd_kernel': {'rows': 18, 'seconds': 102.91},
           '_gemm_kernel': {'rows': 42, 'seconds': 71.75},
           '_layer_norm_bwd_kernel': {'rows': 12, 'seconds': 3.56},
           '_layer_norm_fwd_kernel': {'rows': 24, 'seconds': 7.45},
           '_patch_embed_bwd_images_kernel': {'rows': 6, 'seconds': 6.19},
           '_patch_embed_bwd_weight_kernel': {'rows': 6, 'seconds': 4.98},
           '_patch_embed_fwd_kernel': {'rows': 12, 'seconds': 11.78}},
 'sm_90': {'_attention_bwd_delta_kernel': {'rows': 6, 'seconds': 4.3},
           '_attention_bwd_dkdv_kernel': {'rows': 18, 'seconds': 49.8},
           '_attention_bwd_dq_kernel': {'rows': 18, 'seconds': 45.66},
           '_attention_bwd_fused_kernel': {'rows': 18, 'seconds': 63.35},
           '_attention_fwd_kernel': {'rows': 36, 'seconds': 95.72},
           '_attention_fwd_tma_kernel': {'rows': 12, 'seconds': 17.61},
           '_gemm_kernel': {'rows': 42, 'seconds': 63.83},
           '_gemm_tma_kernel': {'rows': 36, 'seconds': 60.92},
           '_layer_norm_bwd_kernel': {'rows': 12, 'seconds': 3.7},
           '_layer_norm_fwd_kernel': {'rows': 36, 'seconds': 18.4},
           '_patch_embed_bwd_images_kernel': {'rows': 6, 'seconds': 10.42},
           '_patch_embed_bwd_weight_kernel': {'rows': 6, 'seconds': 5.05},
           '_patch_embed_fwd_kernel': {'rows': 12, 'seconds': 18.25},
           '_quantize_rows_fwd_kernel': {'rows': 8, 'seconds': 2.58},
           '_scaled_gemm_kernel': {'rows': 6, 'seconds': 3.39},
           '_scaled_gemm_tma_kernel': {'rows': 6, 'seconds': 3.57}}}
