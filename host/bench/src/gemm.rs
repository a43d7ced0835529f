//! `cogvx bench gemm`: matrix-product throughput on a device at the shapes a CogVideoX step
//! multiplies (by default the 2B's feed-forward at 17,776 tokens: `[17776, 1920] x [1920, 7680]`),
//! in f32 and in the half dtypes of mixed precision.

use crate::{round_to, run_with_threads, BenchError};
use burn::tensor::{backend::Backend, Distribution, FloatDType, Tensor};
use cogvx_model_core::precision::to_dtype;
use serde::Serialize;
use std::time::Instant;

/// What to run: `[m, k] x [k, n]`, `repeat` timed products after one warm-up, in `dtype`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmOptions {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub repeat: usize,
    pub dtype: FloatDType,
    /// CPU threads.
    pub threads: usize,
}

/// One JSON line of `cogvx bench gemm`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GemmReport {
    pub op: String,
    pub backend: String,
    pub dtype: String,
    pub shape: [usize; 3],
    /// Median seconds of one product (result read back).
    pub median_s: f64,
    /// `2 m k n` over the median time, in GFLOP/s.
    pub gflops: f64,
}

fn check(o: &GemmOptions) -> Result<(), BenchError> {
    if o.m == 0 || o.k == 0 || o.n == 0 || o.repeat == 0 {
        return Err(BenchError::Invalid(
            "m, k, n and repeat must be positive".into(),
        ));
    }
    Ok(())
}

/// Runs on any backend and device (the GPU check runs it on CUDA).
pub fn gemm_on<B: Backend>(
    options: GemmOptions,
    device: &B::Device,
) -> Result<GemmReport, BenchError> {
    check(&options)?;
    if !B::supports_dtype(device, options.dtype.into()) {
        return Err(BenchError::Invalid(format!(
            "the {} backend has no {:?} tensors",
            B::name(device),
            options.dtype
        )));
    }
    let GemmOptions {
        m,
        k,
        n,
        repeat,
        dtype,
        ..
    } = options;
    let a = to_dtype(
        Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), device),
        dtype,
    );
    let b = to_dtype(
        Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 1.0), device),
        dtype,
    );
    let mut times = Vec::with_capacity(repeat);
    for i in 0..=repeat {
        let start = Instant::now();
        // Reading one element back waits for the device to finish the product.
        let c = a.clone().matmul(b.clone());
        let _ = c.slice([0..1, 0..1]).into_data();
        if i > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(GemmReport {
        op: "gemm".into(),
        backend: B::name(device),
        dtype: format!("{dtype:?}").to_lowercase(),
        shape: [m, k, n],
        median_s: round_to(median, 6),
        gflops: round_to(2.0 * (m * k * n) as f64 / median / 1e9, 1),
    })
}

/// On the CPU: burn-flex, the backend every CPU run trains on.
pub fn gemm_cpu(options: GemmOptions) -> Result<GemmReport, BenchError> {
    check(&options)?;
    run_with_threads(options.threads, || {
        gemm_on::<cogvx_model_core::FlexBackend>(options, &Default::default())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_product_reports_its_throughput_in_each_dtype() {
        for dtype in [FloatDType::F32, FloatDType::BF16, FloatDType::F16] {
            let r = gemm_cpu(GemmOptions {
                m: 64,
                k: 32,
                n: 48,
                repeat: 3,
                dtype,
                threads: 1,
            })
            .unwrap();
            assert_eq!(r.shape, [64, 32, 48]);
            assert!(r.median_s > 0.0 && r.gflops > 0.0, "{r:?}");
            assert_eq!(r.dtype, format!("{dtype:?}").to_lowercase());
        }
        let bad = gemm_cpu(GemmOptions {
            m: 0,
            k: 1,
            n: 1,
            repeat: 1,
            dtype: FloatDType::F32,
            threads: 1,
        });
        assert!(bad.unwrap_err().to_string().contains("positive"));
        let no_half = gemm_on::<cogvx_model_core::CpuBackend>(
            GemmOptions {
                m: 2,
                k: 2,
                n: 2,
                repeat: 1,
                dtype: FloatDType::BF16,
                threads: 1,
            },
            &Default::default(),
        );
        assert!(no_half.unwrap_err().to_string().contains("ndarray"));
    }
}
