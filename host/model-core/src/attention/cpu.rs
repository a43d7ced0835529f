//! The attention operation of the CPU backends (ndarray, flex): the operands as host `f32`
//! buffers, [`cogvx_kernels::attention`] (gemm tiles, vectorised softmax, heads on rayon's
//! threads), the results back as tensors. Other backends run [`super::flash`], burn operations
//! tile by tile.
//!
//! Half-precision operands are computed in f32 (as FlashAttention's accumulators are); the
//! output and the gradients come back in their operands' dtypes. A bias gradient (which no
//! training in cogvx asks for: T5's position bias is frozen) takes the generic path.

use super::{BlockSizes, Tiling};
use crate::backend::{self, AttentionGrads, AttentionInputs, AttentionSaved};
use crate::host::{tensor, Host};
use burn::tensor::{backend::Backend, ops::FloatTensor, FloatDType};
use cogvx_kernels::attention as kernel;

/// The kernel's shape from q `[B, H, Lq, D]`, k `[B, H, Lk, D]`, v `[B, H, Lk, Dv]`.
fn dims(q: &Host, k: &Host, v: &Host) -> kernel::Dims {
    let ([b, h, lq, d], [kb, kh, lk, kd], [vb, vh, vl, dv]) = (q.dims4(), k.dims4(), v.dims4());
    assert!(
        kb == b && vb == b && kh == h && vh == h && kd == d && vl == lk,
        "attention: q {:?}, k {:?}, v {:?} do not fit [B, H, Lq, D], [B, H, Lk, D], [B, H, Lk, Dv]",
        q.shape,
        k.shape,
        v.shape
    );
    kernel::Dims {
        batch: b,
        heads: h,
        len_q: lq,
        len_k: lk,
        head_dim: d,
        head_dim_v: dv,
    }
}

/// The bias's strides over `[B, H, Lq, Lk]`: its own contiguous strides, 0 along an axis of
/// size 1 (broadcast).
fn bias_strides(bias: &Host, d: &kernel::Dims) -> [usize; 4] {
    let full = [d.batch, d.heads, d.len_q, d.len_k];
    assert!(
        bias.dims4()
            .iter()
            .zip(full)
            .all(|(&x, f)| x == 1 || x == f),
        "attention: bias {:?} does not broadcast to [B, H, Lq, Lk] = {full:?}",
        bias.shape
    );
    let dims = bias.dims4();
    let mut strides = [0usize; 4];
    let mut step = 1;
    for axis in (0..4).rev() {
        strides[axis] = if dims[axis] == 1 { 0 } else { step };
        step *= dims[axis];
    }
    strides
}

/// The kernel's tiles for the requested ones: its own ([`kernel::Tiles::FORWARD`], 256 query
/// rows x 512 keys, and [`kernel::Tiles::BACKWARD`], 128 x 256, which keep a tile's scores in
/// L2) or smaller where asked.
pub fn tiles(requested: BlockSizes) -> Tiling {
    let cap = max_tiles(requested);
    let sizes = |t: kernel::Tiles| {
        let t = t.capped(cap);
        BlockSizes { q: t.q, k: t.k }
    };
    Tiling {
        forward: sizes(kernel::Tiles::FORWARD),
        backward: sizes(kernel::Tiles::BACKWARD),
    }
}

/// The requested tile as the kernel's cap.
fn max_tiles(requested: BlockSizes) -> kernel::Tiles {
    kernel::Tiles {
        q: requested.q,
        k: requested.k,
    }
}

/// An attention call's operands as host buffers: q, k, v, the bias with its broadcast strides,
/// the kernel's shape, scale and largest tiles.
struct Operands {
    q: Host,
    k: Host,
    v: Host,
    bias: Option<(Host, [usize; 4])>,
    dims: kernel::Dims,
    scale: f32,
    max_tiles: kernel::Tiles,
}

impl Operands {
    fn from_inputs<B: Backend>(inputs: AttentionInputs<B>) -> Self {
        let (q, k, v) = (
            Host::new::<B>(inputs.q),
            Host::new::<B>(inputs.k),
            Host::new::<B>(inputs.v),
        );
        let dims = dims(&q, &k, &v);
        let bias = inputs.bias.map(|b| {
            let b = Host::new::<B>(b);
            let strides = bias_strides(&b, &dims);
            (b, strides)
        });
        Self {
            q,
            k,
            v,
            bias,
            dims,
            scale: inputs.scale as f32,
            max_tiles: max_tiles(inputs.sizes),
        }
    }

    fn inputs(&self) -> kernel::Inputs<'_> {
        kernel::Inputs {
            q: self.q.values(),
            k: self.k.values(),
            v: self.v.values(),
            bias: self.bias.as_ref().map(|(b, strides)| kernel::Bias {
                values: b.values(),
                strides: *strides,
            }),
            dims: self.dims,
            scale: self.scale,
            max_tiles: self.max_tiles,
        }
    }
}

/// [`crate::backend::ModelBackend::flash_attention_forward`] for a CPU backend.
pub fn forward<B: Backend>(inputs: AttentionInputs<B>) -> AttentionSaved<B> {
    let device = B::float_device(&inputs.q);
    let ops = Operands::from_inputs(inputs);
    let f = kernel::forward(ops.inputs());
    let [b, h, lq, _] = ops.q.dims4();
    AttentionSaved {
        out: tensor::<B>(
            f.out,
            [b, h, lq, ops.dims.head_dim_v].into(),
            ops.q.dtype,
            &device,
        ),
        lse: tensor::<B>(f.lse, [b, h, lq, 1].into(), FloatDType::F32, &device),
    }
}

/// [`crate::backend::ModelBackend::flash_attention_backward`] for a CPU backend.
pub fn backward<B: Backend>(
    inputs: AttentionInputs<B>,
    saved: AttentionSaved<B>,
    grad_out: FloatTensor<B>,
    bias_grad: bool,
) -> AttentionGrads<B> {
    if bias_grad && inputs.bias.is_some() {
        return backend::generic_flash_attention_backward(inputs, saved, grad_out, bias_grad);
    }
    let device = B::float_device(&inputs.q);
    let ops = Operands::from_inputs(inputs);
    let (out, lse, grad_out) = (
        Host::new::<B>(saved.out),
        Host::new::<B>(saved.lse),
        Host::new::<B>(grad_out),
    );
    let g = kernel::backward(ops.inputs(), out.values(), lse.values(), grad_out.values());
    let (q, k, v) = (&ops.q, &ops.k, &ops.v);
    AttentionGrads {
        q: tensor::<B>(g.q, q.shape.clone(), q.dtype, &device),
        k: tensor::<B>(g.k, k.shape.clone(), k.dtype, &device),
        v: tensor::<B>(g.v, v.shape.clone(), v.dtype, &device),
        bias: None,
    }
}
