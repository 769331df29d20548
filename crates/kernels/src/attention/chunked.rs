//! Memory-lean attention core with learned sinks: `softmax([q·kᵀ·scale + mask, sink]) · v` over
//! query-row chunks, with a recomputing backward.
//!
//! The reference path in `attention.rs` builds `[B, nh, T, Tk]` scores and probabilities for all
//! rows at once and autograd keeps them (plus their gradients) until the backward: at T = 2048 and
//! 64 heads that is 512 MiB per tensor in bf16. Here the forward runs chunk by chunk (rows bounded
//! by [`CHUNK_ELEMS`]), keeps nothing but the output, and the backward recomputes each chunk's
//! probabilities (the flash-attention recipe, with cuBLAS matmuls and the fused sink softmax
//! kernel instead of one fused kernel). Chunks of sliding-window layers only touch the keys their
//! rows can see (`window` + rows instead of all `Tk`), which the causal/sliding mask guarantees.
//!
//! Gradients: with `P = softmax_sink(S)`, `dV = Pᵀ·dO`, `dP = dO·Vᵀ`,
//! `dS = scale · P ⊙ (dP − Σ_j P·dP)` (the sink column has no value and sinks are frozen),
//! `dQ = dS·K`, `dK = dSᵀ·Q`; `dK`/`dV` are accumulated in f32 over chunks.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::sink_softmax::{sink_softmax, sink_softmax_grad};
use super::visibility::KeyMask;

/// Upper bound on `heads · rows · keys` of one chunk's score tensor (2^26 elements: 128 MiB in bf16).
pub const CHUNK_ELEMS: usize = 1 << 26;

/// What a call needs besides q, k, v.
#[derive(Clone)]
struct Plan {
    mask: Option<KeyMask>,
    sinks: Tensor,
    scale: f64,
    /// The mask's sliding window (`None` without a mask).
    window: Option<usize>,
    /// Bound on `heads · rows · keys` per chunk.
    budget: usize,
}

/// Attention with sinks.
///
/// * `q` `[B, nh, T, d]`, `k`, `v` `[B, nkv, Tk, d]` (run dtype; `nh` a multiple of `nkv`, query
///   head `h` uses key/value head `h / (nh / nkv)`); query `i` sits at key index `Tk − T + i`.
/// * `mask`: which keys each query sees ([`KeyMask`]: causal, sliding window, padding, packed
///   documents), computed from indices; chunks skip the keys the causal / window rules hide for all
///   of their rows. `None`: every key is visible.
/// * `sinks` `[nh]`, `scale` (`1/√d`).
///
/// Returns `[B, nh, T, d]` (q's dtype), differentiable in `q`, `k` and `v`.
pub fn sink_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    sinks: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    with_budget(q, k, v, mask, sinks, scale, CHUNK_ELEMS)?.head_major()
}

/// [`sink_attention`] returning `[B, T, nh, d]`, the layout the output projection reads. The CUDA
/// kernel writes that layout, so no transpose enters the autograd graph (each transpose's gradient
/// would be materialized).
pub fn sink_attention_token_major(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    sinks: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    match with_budget(q, k, v, mask, sinks, scale, CHUNK_ELEMS)? {
        CoreOut::TokenMajor(t) => Ok(t),
        CoreOut::HeadMajor(t) => t.transpose(1, 2),
    }
}

/// The attention output in the layout it was computed in.
enum CoreOut {
    /// `[B, nh, T, d]`.
    HeadMajor(Tensor),
    /// `[B, T, nh, d]` (the CUDA kernel's).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    TokenMajor(Tensor),
}

impl CoreOut {
    /// `[B, nh, T, d]` (a view of the token-major output).
    fn head_major(self) -> candle_core::Result<Tensor> {
        match self {
            Self::HeadMajor(t) => Ok(t),
            Self::TokenMajor(t) => t.transpose(1, 2),
        }
    }
}

/// [`sink_attention`] with a chosen chunk bound (tests use small ones).
fn with_budget(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    sinks: &Tensor,
    scale: f64,
    budget: usize,
) -> candle_core::Result<CoreOut> {
    if let Some(m) = mask {
        m.check(q.dim(0)?, k.dim(2)?)?;
    }
    let plan = Plan {
        mask: mask.cloned(),
        sinks: sinks.clone(),
        scale,
        window: mask.and_then(|m| m.window),
        budget,
    };
    let track = q.track_op() || k.track_op() || v.track_op();
    #[cfg(feature = "cuda")]
    if crate::fast_path::FastPath::FlashForward.on_for(q)
        && super::flash::supports(q, k, v, plan.mask.as_ref())
    {
        // One kernel, run inside the autograd node; it writes `[B, T, nh, d]` (what the output
        // projection reads).
        let fwd = super::flash::FlashFwd::new(plan.mask.as_ref(), sinks, scale)?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let out = if track {
            q.apply_op3(
                &k,
                &v,
                Attach {
                    out: Out::Flash(fwd),
                    plan,
                },
            )?
        } else {
            q.apply_op3_no_bwd(&k, &v, &fwd)?
        };
        return Ok(CoreOut::TokenMajor(out));
    }
    let out = plan.forward(&q.detach(), &k.detach(), &v.detach())?;
    if !track {
        return Ok(CoreOut::HeadMajor(out));
    }
    Ok(CoreOut::HeadMajor(q.apply_op3(
        k,
        v,
        Attach {
            out: Out::Computed(out),
            plan,
        },
    )?))
}

/// Dimensions of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    tk: usize,
    d: usize,
}

/// What a chunk's forward computes and its backward reuses.
struct ChunkProbs {
    qc: Tensor,
    p: Tensor,
    kc: Tensor,
    vc: Tensor,
}

/// One chunk: query rows `r0..r0+rows`, keys `k0..k0+kw`.
#[derive(Clone, Copy)]
struct Chunk {
    r0: usize,
    rows: usize,
    k0: usize,
    kw: usize,
}

impl Plan {
    fn dims(q: &Tensor, k: &Tensor) -> candle_core::Result<Dims> {
        let (b, nh, t, d) = q.dims4()?;
        let (bk, nkv, tk, dk) = k.dims4()?;
        if bk != b || dk != d || nkv == 0 || nh % nkv != 0 || tk < t {
            candle_core::bail!(
                "sink_attention: q {:?} does not fit k {:?}",
                q.dims(),
                k.dims()
            );
        }
        Ok(Dims {
            b,
            nh,
            nkv,
            t,
            tk,
            d,
        })
    }

    /// The chunks covering all rows.
    fn chunks(&self, dm: Dims) -> Vec<Chunk> {
        let off = dm.tk - dm.t;
        let keys_for = |r0: usize, rows: usize| -> (usize, usize) {
            if self.mask.is_none() {
                return (0, dm.tk);
            }
            let k1 = (off + r0 + rows).min(dm.tk);
            let k0 = match self.window {
                Some(w) => (off + r0 + 1).saturating_sub(w),
                None => 0,
            };
            (k0, k1.saturating_sub(k0))
        };
        let per_row = |kw: usize| dm.nh.max(1) * kw.max(1);
        let rows = match self.window {
            // sliding: rows a few windows long, keys ≈ rows + window
            Some(w) if self.mask.is_some() => (4 * w).max(64),
            _ => self.budget / per_row(dm.tk),
        };
        let rows = rows.min(self.budget / per_row(rows + self.window.unwrap_or(0)).max(1));
        let rows = rows.clamp(1, dm.t.max(1));
        let mut out = Vec::new();
        let mut r0 = 0;
        while r0 < dm.t {
            let n = rows.min(dm.t - r0);
            let (k0, kw) = keys_for(r0, n);
            out.push(Chunk {
                r0,
                rows: n,
                k0,
                kw,
            });
            r0 += n;
        }
        out
    }

    /// Query rows of a chunk in the grouped layout `[B, nkv, g·rows, d]` (contiguous).
    fn rows_grouped(x: &Tensor, dm: Dims, c: Chunk) -> candle_core::Result<Tensor> {
        x.narrow(2, c.r0, c.rows)?.contiguous()?.reshape((
            dm.b,
            dm.nkv,
            dm.nh / dm.nkv * c.rows,
            dm.d,
        ))
    }

    /// A chunk's grouped queries `[B, nkv, g·rows, d]`, probabilities `[B, nh, rows, kw]` and
    /// keys/values `[B, nkv, kw, d]`; `None` when the chunk sees no key (its rows are zero).
    fn probs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dm: Dims,
        c: Chunk,
    ) -> candle_core::Result<Option<ChunkProbs>> {
        if c.kw == 0 {
            return Ok(None);
        }
        let qc = Self::rows_grouped(q, dm, c)?;
        let kc = k.narrow(2, c.k0, c.kw)?.contiguous()?;
        let vc = v.narrow(2, c.k0, c.kw)?.contiguous()?;
        let s = qc
            .matmul(&kc.t()?.contiguous()?)?
            .reshape((dm.b, dm.nh, c.rows, c.kw))?;
        let mc = match &self.mask {
            Some(m) => Some(m.additive(
                (c.r0, c.rows),
                (c.k0, c.kw),
                (dm.t, dm.tk),
                s.dtype(),
                s.device(),
            )?),
            None => None,
        };
        let p = sink_softmax(&s, mc.as_ref(), &self.sinks, self.scale)?;
        Ok(Some(ChunkProbs { qc, p, kc, vc }))
    }

    /// Zero rows `[B, nh, rows, d]` for a chunk without keys.
    fn zero_rows(q: &Tensor, dm: Dims, c: Chunk) -> candle_core::Result<Tensor> {
        Tensor::zeros((dm.b, dm.nh, c.rows, dm.d), q.dtype(), q.device())
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let dm = Self::dims(q, k)?;
        let g = dm.nh / dm.nkv;
        let mut outs = Vec::new();
        for c in self.chunks(dm) {
            outs.push(match self.probs(q, k, v, dm, c)? {
                None => Self::zero_rows(q, dm, c)?,
                Some(cp) => {
                    cp.p.reshape((dm.b, dm.nkv, g * c.rows, c.kw))?
                        .matmul(&cp.vc)?
                        .reshape((dm.b, dm.nh, c.rows, dm.d))?
                }
            });
        }
        Tensor::cat(&outs, 2)
    }

    /// `(dq, dk, dv)` for the output gradient `go` `[B, nh, T, d]`.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        go: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let dm = Self::dims(q, k)?;
        let g = dm.nh / dm.nkv;
        let go = go.to_dtype(q.dtype())?;
        let mut dq = Vec::new();
        let mut dk = Tensor::zeros((dm.b, dm.nkv, dm.tk, dm.d), DType::F32, q.device())?;
        let mut dv = dk.clone();
        for c in self.chunks(dm) {
            let Some(ChunkProbs { qc, p, kc, vc }) = self.probs(q, k, v, dm, c)? else {
                dq.push(Self::zero_rows(q, dm, c)?);
                continue;
            };
            let gc = Self::rows_grouped(&go, dm, c)?; // [B, nkv, g·rows, d]
            let pg = p.reshape((dm.b, dm.nkv, g * c.rows, c.kw))?;
            let dv_c = pg.t()?.matmul(&gc)?; // [B, nkv, kw, d]
            let dp = gc
                .matmul(&vc.t()?.contiguous()?)?
                .reshape((dm.b, dm.nh, c.rows, c.kw))?;
            let ds = sink_softmax_grad(&p, &dp, self.scale)?.reshape((
                dm.b,
                dm.nkv,
                g * c.rows,
                c.kw,
            ))?;
            dq.push(ds.matmul(&kc)?.reshape((dm.b, dm.nh, c.rows, dm.d))?);
            let dk_c = ds.t()?.matmul(&qc)?; // [B, nkv, kw, d]
            let pad = |x: Tensor| -> candle_core::Result<Tensor> {
                x.to_dtype(DType::F32)?
                    .pad_with_zeros(2, c.k0, dm.tk - c.k0 - c.kw)
            };
            dk = (dk + pad(dk_c)?)?;
            dv = (dv + pad(dv_c)?)?;
        }
        Ok((
            Tensor::cat(&dq, 2)?,
            dk.to_dtype(k.dtype())?,
            dv.to_dtype(v.dtype())?,
        ))
    }
}

/// What the autograd node's forward produces.
enum Out {
    /// The output computed by [`Plan::forward`] (`[B, nh, T, d]`), handed out (one copy).
    Computed(Tensor),
    /// The flash kernel, run on the node's inputs: `[B, T, nh, d]`.
    #[cfg(feature = "cuda")]
    Flash(super::flash::FlashFwd),
}

/// The autograd node: its forward hands out the output of [`Out`], its backward recomputes chunk
/// by chunk.
struct Attach {
    out: Out,
    plan: Plan,
}

impl Attach {
    /// The precomputed output (checked to be a fresh contiguous tensor).
    #[cfg_attr(not(feature = "cuda"), allow(clippy::infallible_destructuring_match))]
    fn computed(&self) -> candle_core::Result<&Tensor> {
        let t = match &self.out {
            Out::Computed(t) => t,
            #[cfg(feature = "cuda")]
            Out::Flash(_) => {
                candle_core::bail!("sink_attention: the flash forward runs on CUDA only")
            }
        };
        if t.layout().contiguous_offsets() != Some((0, t.elem_count())) {
            candle_core::bail!("sink_attention: output not a fresh contiguous tensor");
        }
        Ok(t)
    }
}

impl CustomOp3 for Attach {
    fn name(&self) -> &'static str {
        "sink-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (s, l) = self.computed()?.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("sink_attention: q on the CPU, output elsewhere"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if let Out::Flash(f) = &self.out {
            return f.cuda_fwd(qs, ql, ks, kl, vs, vl);
        }
        let (s, l) = self.computed()?.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("sink_attention: q on CUDA, output elsewhere"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let go = match &self.out {
            Out::Computed(_) => grad.detach(),
            #[cfg(feature = "cuda")]
            Out::Flash(f) => {
                if crate::fast_path::FastPath::FlashBackward.on_for(q) {
                    let (dq, dk, dv) = crate::profile::scope("attn.core.bwd", q.device(), || {
                        super::flash::backward(f, q, k, v, _res, grad)
                    })?;
                    return Ok((Some(dq), Some(dk), Some(dv)));
                }
                // the flash output is `[B, T, nh, d]`
                grad.detach().transpose(1, 2)?
            }
        };
        let (dq, dk, dv) = crate::profile::scope("attn.core.bwd", q.device(), || {
            self.plan
                .backward(&q.detach(), &k.detach(), &v.detach(), &go)
        })?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The reference ops of `attention.rs` (full scores, candle softmax with the sink column).
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        sinks: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let (b, nh, t, d) = q.dims4()?;
        let (_, nkv, tk, _) = k.dims4()?;
        let g = nh / nkv;
        let qg = q.contiguous()?.reshape((b, nkv, g * t, d))?;
        let s = qg.matmul(&k.t()?.contiguous()?)?.reshape((b, nh, t, tk))?;
        let s = (s * scale)?.broadcast_add(mask)?;
        let sk = sinks.reshape((1, nh, 1, 1))?;
        let max = s.max_keepdim(D::Minus1)?.broadcast_maximum(&sk)?.detach();
        let e = s.broadcast_sub(&max)?.exp()?;
        let es = sk.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&(e.sum_keepdim(D::Minus1)? + es)?)?;
        p.reshape((b, nkv, g * t, tk))?
            .matmul(&v.contiguous()?)?
            .reshape((b, nh, t, d))
    }

    /// A [`KeyMask`] and, built element by element from the same rules, its dense additive mask
    /// `[B or 1, 1, T, Tk]`: causal (+ sliding `w`), with `padded` key 0 of batch row 1 hidden, with
    /// `docs` documents starting at keys `tk / 3` and `2·tk / 3` (row 0) and `tk / 2` (row 1).
    fn rules(
        b: usize,
        t: usize,
        tk: usize,
        w: Option<usize>,
        padded: bool,
        docs: bool,
    ) -> candle_core::Result<(KeyMask, Tensor)> {
        let off = tk - t;
        let valid: Vec<u8> = (0..b * tk)
            .map(|x| u8::from(!(padded && x / tk == 1 && x % tk == 0)))
            .collect();
        let start = |bi: usize, j: usize| -> usize {
            let cuts: &[usize] = if bi == 0 {
                &[tk / 3, 2 * tk / 3]
            } else {
                &[tk / 2]
            };
            cuts.iter().copied().filter(|&c| c <= j).max().unwrap_or(0)
        };
        let ds: Vec<u32> = (0..b * tk).map(|x| start(x / tk, x % tk) as u32).collect();
        let mb = if padded || docs { b } else { 1 };
        let mut m = vec![0f32; mb * t * tk];
        for bi in 0..mb {
            for i in 0..t {
                let p = off + i;
                for j in 0..tk {
                    let hidden = j > p
                        || w.is_some_and(|w| j + w <= p)
                        || (padded && valid[bi * tk + j] == 0)
                        || (docs && j < start(bi, p));
                    if hidden {
                        m[(bi * t + i) * tk + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let dev = Device::Cpu;
        let km = KeyMask {
            window: w,
            key_valid: if padded {
                Some(Tensor::from_vec(valid, (b, tk), &dev)?)
            } else {
                None
            },
            doc_start: if docs {
                Some(Tensor::from_vec(ds, (b, tk), &dev)?)
            } else {
                None
            },
        };
        Ok((km, Tensor::from_vec(m, (mb, 1, t, tk), &dev)?))
    }

    /// The flash forward kernel (bf16) against the f32 reference on the same bf16-rounded inputs,
    /// gpt-oss head layout, with padding, sliding windows, a KV offset and no mask.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_flash_forward_matches_reference() -> candle_core::Result<()> {
        let gpu = Device::new_cuda(0)?;
        let cpu = Device::Cpu;
        let (b, nh, nkv, d) = (2, 64, 8, 64);
        // (t, tk, window, masked, padded, docs)
        let cases = [
            (1100, 1100, None, true, true, false),
            (1100, 1100, Some(128), true, true, false),
            (1100, 1100, None, true, false, false),
            (1100, 1100, Some(128), true, false, false),
            (1100, 1100, None, true, false, true),
            (1100, 1100, Some(128), true, true, true),
            (70, 70, None, true, true, false),
            (5, 300, Some(128), true, true, false),
            (5, 300, Some(128), true, false, false),
            (1, 37, None, true, false, false),
            (130, 130, None, false, false, false),
        ];
        for (t, tk, w, masked, padded, docs) in cases {
            let bf = |dims: (usize, usize, usize, usize)| -> candle_core::Result<Tensor> {
                Tensor::randn(0f32, 1.0, dims, &cpu)?
                    .to_dtype(DType::BF16)?
                    .to_dtype(DType::F32)
            };
            let (q, k, v) = (
                bf((b, nh, t, d))?,
                bf((b, nkv, tk, d))?,
                bf((b, nkv, tk, d))?,
            );
            let sinks = Tensor::randn(0f32, 1.0, nh, &cpu)?;
            let (km, m) = if masked {
                rules(b, t, tk, w, padded, docs)?
            } else {
                (
                    KeyMask::causal(None),
                    Tensor::zeros((1, 1, t, tk), DType::F32, &cpu)?,
                )
            };
            let want = reference(&q, &k, &v, &m, &sinks, 0.125)?;
            let g = |x: &Tensor| x.to_dtype(DType::BF16)?.to_device(&gpu);
            let on_gpu = |x: &Option<Tensor>| x.as_ref().map(|x| x.to_device(&gpu)).transpose();
            let mg = if masked {
                Some(KeyMask {
                    window: km.window,
                    key_valid: on_gpu(&km.key_valid)?,
                    doc_start: on_gpu(&km.doc_start)?,
                })
            } else {
                None
            };
            let (qg, kg, vg) = (g(&q)?, g(&k)?, g(&v)?);
            assert!(super::super::flash::supports(&qg, &kg, &vg, mg.as_ref()));
            let (qv, kv, vv) = (
                Var::from_tensor(&qg)?,
                Var::from_tensor(&kg)?,
                Var::from_tensor(&vg)?,
            );
            let sg = sinks.to_device(&gpu)?;
            let out = sink_attention(
                qv.as_tensor(),
                kv.as_tensor(),
                vv.as_tensor(),
                mg.as_ref(),
                &sg,
                0.125,
            )?;
            let got = out.to_device(&cpu)?;
            let diff = max_diff(&got, &want);
            assert!(
                diff < 1.5e-2,
                "t {t} tk {tk} window {w:?} masked {masked} padded {padded} docs {docs}: differs by {diff}"
            );
            // gradients: flash forward output layout through the chunked backward
            let go = Tensor::randn(0f32, 1.0, (b, nh, t, d), &cpu)?;
            let (qr, kr, vr) = (
                Var::from_tensor(&q)?,
                Var::from_tensor(&k)?,
                Var::from_tensor(&v)?,
            );
            let r = reference(
                qr.as_tensor(),
                kr.as_tensor(),
                vr.as_tensor(),
                &m,
                &sinks,
                0.125,
            )?;
            let gr = (&r * &go)?.sum_all()?.backward()?;
            let ga = (out.to_dtype(DType::F32)? * go.to_device(&gpu)?)?
                .sum_all()?
                .backward()?;
            for (name, a, r) in [("q", &qv, &qr), ("k", &kv, &kr), ("v", &vv, &vr)] {
                let (Some(a), Some(r)) = (ga.get(a.as_tensor()), gr.get(r.as_tensor())) else {
                    panic!("no gradient for {name}");
                };
                let dd = max_diff(&a.to_device(&cpu)?, r);
                assert!(
                    dd < 3e-2,
                    "t {t} tk {tk} window {w:?} padded {padded} docs {docs}: d{name} differs by {dd}"
                );
            }
        }
        Ok(())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::test_util::rel_diff(a, b).unwrap_or(f32::INFINITY)
    }

    fn check(t: usize, tk: usize, w: Option<usize>, budget: usize) -> candle_core::Result<()> {
        for (padded, docs) in [(true, false), (false, true), (true, true)] {
            check_with(t, tk, w, budget, padded, docs)?;
        }
        Ok(())
    }

    fn check_with(
        t: usize,
        tk: usize,
        w: Option<usize>,
        budget: usize,
        padded: bool,
        docs: bool,
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, nh, nkv, d) = (2, 4, 2, 8);
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, nkv, tk, d), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, nkv, tk, d), &dev)?)?;
        let sinks = Tensor::randn(0f32, 1.0, nh, &dev)?;
        let (km, m) = rules(b, t, tk, w, padded, docs)?;
        let scale = 1.0 / (d as f64).sqrt();
        let g = Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev)?;
        let a = with_budget(&q, &k, &v, Some(&km), &sinks, scale, budget)?.head_major()?;
        let r = reference(&q, &k, &v, &m, &sinks, scale)?;
        let d0 = max_diff(&a, &r);
        assert!(
            d0 < 1e-5,
            "t {t} tk {tk} w {w:?} padded {padded} docs {docs}: forward differs by {d0}"
        );
        let ga = (&a * &g)?.sum_all()?.backward()?;
        let gr = (&r * &g)?.sum_all()?.backward()?;
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (Some(x1), Some(x2)) = (ga.get(x.as_tensor()), gr.get(x.as_tensor())) else {
                panic!("missing gradient of {name}");
            };
            let dd = max_diff(x1, x2);
            assert!(dd < 1e-5, "t {t} tk {tk} w {w:?}: d{name} differs by {dd}");
        }
        Ok(())
    }

    #[test]
    fn matches_reference_values_and_gradients() -> candle_core::Result<()> {
        // whole rows in one chunk, several chunks (sliding: rows 4·w), and a KV-cache offset
        let big = CHUNK_ELEMS;
        check(7, 7, None, big)?;
        check(40, 40, Some(3), big)?;
        check(300, 300, Some(16), big)?;
        check(5, 12, Some(4), big)?;
        check(6, 9, None, big)?;
        // several full-attention chunks (4 heads · 8 rows · 33 keys per chunk at most)
        check(33, 33, None, 4 * 8 * 33)?;
        check(20, 29, None, 4 * 3 * 29)
    }

    #[test]
    fn chunks_cover_rows_and_visible_keys() {
        let plan = Plan {
            mask: Some(KeyMask::causal(Some(128))),
            sinks: Tensor::zeros(1, DType::F32, &Device::Cpu)
                .unwrap_or_else(|_| unreachable!("zeros on the CPU")),
            scale: 1.0,
            window: Some(128),
            budget: CHUNK_ELEMS,
        };
        let dm = Dims {
            b: 1,
            nh: 64,
            nkv: 8,
            t: 2048,
            tk: 2048,
            d: 64,
        };
        let cs = plan.chunks(dm);
        assert_eq!(cs.iter().map(|c| c.rows).sum::<usize>(), 2048);
        for c in &cs {
            // the first row of a chunk sees keys from r0 − 127, the last up to r0 + rows − 1
            assert_eq!(c.k0, (c.r0 + 1).saturating_sub(128));
            assert_eq!(c.k0 + c.kw, c.r0 + c.rows);
        }
    }
}
