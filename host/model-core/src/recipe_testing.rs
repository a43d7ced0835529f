//! Test support for adapter plugins (feature `testing`), used by dora's, loha's and lokr's
//! `tests/recipe.rs`: small f64 matrix helpers for hand-written PEFT references, and the host's
//! recipe interpreter ([`crate::adapter`]) driven with given parameter values.

use crate::adapter::{AdapterTensor, LinearAdapter, RecipeAdapter, RecipeLimits};
use crate::{CpuAutodiffBackend, CpuDevice};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use cogvx_plugin_api::{AdapterRecipe, AdapterRequest};
use std::collections::BTreeMap;

pub type AD = CpuAutodiffBackend;

/// A row-major f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub v: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            v: vec![0.0; rows * cols],
        }
    }
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.v[i * self.cols + j]
    }
    pub fn set(&mut self, i: usize, j: usize, x: f64) {
        self.v[i * self.cols + j] = x;
    }
    pub fn matmul(&self, b: &Mat) -> Mat {
        assert_eq!(self.cols, b.rows);
        let mut out = Mat::zeros(self.rows, b.cols);
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self.at(i, k);
                for j in 0..b.cols {
                    out.v[i * b.cols + j] += a * b.at(k, j);
                }
            }
        }
        out
    }
    pub fn t(&self) -> Mat {
        let mut out = Mat::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                out.set(j, i, self.at(i, j));
            }
        }
        out
    }
    pub fn zip(&self, b: &Mat, f: impl Fn(f64, f64) -> f64) -> Mat {
        assert_eq!((self.rows, self.cols), (b.rows, b.cols));
        Mat {
            rows: self.rows,
            cols: self.cols,
            v: self.v.iter().zip(&b.v).map(|(x, y)| f(*x, *y)).collect(),
        }
    }
    pub fn add(&self, b: &Mat) -> Mat {
        self.zip(b, |x, y| x + y)
    }
    pub fn hadamard(&self, b: &Mat) -> Mat {
        self.zip(b, |x, y| x * y)
    }
    pub fn scale(&self, s: f64) -> Mat {
        Mat {
            rows: self.rows,
            cols: self.cols,
            v: self.v.iter().map(|x| x * s).collect(),
        }
    }
    /// `torch.kron(self, b)`.
    pub fn kron(&self, b: &Mat) -> Mat {
        let mut out = Mat::zeros(self.rows * b.rows, self.cols * b.cols);
        for i in 0..self.rows {
            for j in 0..self.cols {
                for k in 0..b.rows {
                    for l in 0..b.cols {
                        out.set(i * b.rows + k, j * b.cols + l, self.at(i, j) * b.at(k, l));
                    }
                }
            }
        }
        out
    }
    /// The L2 norm of each row.
    pub fn row_norms(&self) -> Vec<f64> {
        (0..self.rows)
            .map(|i| {
                (0..self.cols)
                    .map(|j| self.at(i, j).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    }
    pub fn dot(&self, b: &Mat) -> f64 {
        self.v.iter().zip(&b.v).map(|(x, y)| x * y).sum()
    }
}

/// Deterministic values in (-1, 1) (splitmix64), rounded to f32 so that the f64 reference and
/// the f32 interpreter start from the same numbers.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn value(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = (z >> 11) as f64 / (1u64 << 53) as f64;
        ((2.0 * u - 1.0) as f32) as f64
    }
    pub fn mat(&mut self, rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            v: (0..rows * cols).map(|_| self.value()).collect(),
        }
    }
    pub fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.value()).collect()
    }
}

pub fn request(in_features: u32, out_features: u32, rank: u32, alpha: f32) -> AdapterRequest {
    AdapterRequest {
        layer: "transformer_blocks.0.attn1.to_q".into(),
        in_features,
        out_features,
        rank,
        alpha,
    }
}

fn m2(m: &Mat) -> Tensor<AD, 2> {
    let v: Vec<f32> = m.v.iter().map(|x| *x as f32).collect();
    Tensor::from_data(TensorData::new(v, [m.rows, m.cols]), &CpuDevice::default())
}

/// The recipe's adapter on the base weight `w` (validated by the host with its default limits),
/// freshly initialised from `seed`.
pub fn build(recipe: AdapterRecipe, req: AdapterRequest, w: &Mat, seed: u64) -> LinearAdapter<AD> {
    let dev = CpuDevice::default();
    AD::seed(&dev, seed);
    let rec = RecipeAdapter::<AD>::new(recipe, req, &m2(w), RecipeLimits::default(), &dev)
        .unwrap_or_else(|e| panic!("the host refused the recipe: {e}"));
    LinearAdapter::Recipe(rec)
}

/// Sets parameters by export suffix (matrices as `Mat`, vectors as a one-row `Mat`).
pub fn set(adapter: &mut LinearAdapter<AD>, values: &[(&str, Mat)]) {
    for (suffix, m) in values {
        let shape = adapter
            .tensors()
            .into_iter()
            .find(|(s, _, _)| s == suffix)
            .unwrap_or_else(|| panic!("no parameter {suffix}"))
            .1
            .shape();
        let v: Vec<f32> = m.v.iter().map(|x| *x as f32).collect();
        let t = AdapterTensor::from_vec(&shape, v, &CpuDevice::default())
            .expect("same number of values");
        adapter.set_tensor("test", suffix, t).unwrap();
    }
}

/// Parameter values by export suffix, with their shapes.
pub fn values(adapter: &LinearAdapter<AD>) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    adapter
        .tensors()
        .into_iter()
        .map(|(s, t, _)| {
            (
                s,
                (t.shape(), t.to_vec().into_iter().map(f64::from).collect()),
            )
        })
        .collect()
}

/// The graph's output (`ΔW` or `W'`) for the base weight `w`.
pub fn evaluate(adapter: &LinearAdapter<AD>, w: &Mat) -> Mat {
    let LinearAdapter::Recipe(rec) = adapter else {
        panic!("not a recipe adapter")
    };
    let out = rec.evaluate(m2(w));
    let [rows, cols] = out.dims();
    Mat {
        rows,
        cols,
        v: out
            .into_data()
            .to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
    }
}

/// The gradient of `L = Σ output ⊙ g` with respect to every parameter (by export suffix), by the
/// interpreter's autodiff; `∂L/∂output = g`.
pub fn grads(adapter: &LinearAdapter<AD>, w: &Mat, g: &Mat) -> BTreeMap<String, Vec<f64>> {
    let LinearAdapter::Recipe(rec) = adapter else {
        panic!("not a recipe adapter")
    };
    let loss = (rec.evaluate(m2(w)) * m2(g)).sum();
    let gr = loss.backward();
    adapter
        .tensors()
        .into_iter()
        .map(|(s, t, _)| {
            let v: Vec<f32> = match t {
                AdapterTensor::Vector(t) => {
                    t.grad(&gr).map(|g| g.into_data().to_vec::<f32>().unwrap())
                }
                AdapterTensor::Matrix(t) => {
                    t.grad(&gr).map(|g| g.into_data().to_vec::<f32>().unwrap())
                }
            }
            .unwrap_or_else(|| panic!("no gradient for {s}"));
            (s, v.into_iter().map(f64::from).collect())
        })
        .collect()
}

/// The layer's output `x Wᵀ + b` with the adapter, for `x [rows, in]`.
pub fn forward(adapter: &LinearAdapter<AD>, x: &Mat, w: &Mat, b: &[f64]) -> Mat {
    let bias = Tensor::<AD, 1>::from_data(
        TensorData::new(b.iter().map(|v| *v as f32).collect::<Vec<_>>(), [b.len()]),
        &CpuDevice::default(),
    );
    let y = adapter.forward(m2(x), m2(w), Some(bias));
    let [rows, cols] = y.dims();
    Mat {
        rows,
        cols,
        v: y.into_data()
            .to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
    }
}

/// `x Wᵀ + b` in f64.
pub fn linear(x: &Mat, w: &Mat, b: &[f64]) -> Mat {
    let mut y = x.matmul(&w.t());
    for row in y.v.chunks_mut(w.rows) {
        for (v, bias) in row.iter_mut().zip(b) {
            *v += bias;
        }
    }
    y
}

/// Asserts `|got - want| <= tol * (1 + max|want|)` element-wise.
pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = 1.0 + want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: got {g}, want {w} (tolerance {tol} x {scale})\n got {got:?}\nwant {want:?}");
    }
}

/// `x` is uniform in `±bound`, and not constant (a random init was drawn).
pub fn assert_uniform_within(x: &[f64], bound: f64, what: &str) {
    assert!(
        x.iter().all(|v| v.abs() <= bound + 1e-7),
        "{what}: outside ±{bound}: {x:?}"
    );
    assert!(
        x.iter().any(|v| v.abs() > bound * 0.05),
        "{what}: not randomly initialised: {x:?}"
    );
}
