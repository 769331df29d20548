//! Which keys a query sees, as O(T) structure: no `[T, Tk]` mask tensor is ever built for a whole
//! call. The kernels test visibility from indices; the chunked CPU path builds one chunk's additive
//! slice (`[B or 1, 1, rows, kw]`) at a time with [`KeyMask::additive`].
//!
//! Query `i` of `T` sits at key index `off + i` (`off = Tk − T`, the cached keys before it) and sees
//! key `j` iff
//! * `j ≤ off + i` (causal),
//! * `j > off + i − w` when `window = Some(w)` (sliding window),
//! * `key_valid[b, j] ≠ 0` when given (padding),
//! * `j ≥ doc_start[b, off + i]` when given (packed documents: no attention across them).

use candle_core::{DType, Device, Tensor};

/// Causal key visibility with an optional sliding window, padding and packed-document boundaries.
#[derive(Debug, Clone)]
pub struct KeyMask {
    /// Sliding window `w`: key `j` visible to the query at key index `p` only if `j > p − w`.
    pub window: Option<usize>,
    /// `[B, Tk]` u8: 1 = a token, 0 = padding (never attended to).
    pub key_valid: Option<Tensor>,
    /// `[B, Tk]` u32: the key index at which the document holding key `j` starts (so
    /// `doc_start[b, j] ≤ j`, nondecreasing along `j`; all zeros for one document per row).
    pub doc_start: Option<Tensor>,
}

impl KeyMask {
    /// Causal visibility, with a sliding `window` if given; no padding, one document per row.
    pub fn causal(window: Option<usize>) -> Self {
        Self {
            window,
            key_valid: None,
            doc_start: None,
        }
    }

    /// Whether only the causal / window rules apply (no padding, no document boundaries): the
    /// kernels then skip the per-element tests on tiles every row sees completely.
    pub fn is_structural(&self) -> bool {
        self.key_valid.is_none() && self.doc_start.is_none()
    }

    /// Rows of the per-row arrays (1 when there are none).
    pub fn batch(&self) -> candle_core::Result<usize> {
        match (&self.key_valid, &self.doc_start) {
            (Some(a), _) | (None, Some(a)) => a.dim(0),
            (None, None) => Ok(1),
        }
    }

    /// Checks the per-row arrays against a call with `b` rows and `tk` keys.
    pub fn check(&self, b: usize, tk: usize) -> candle_core::Result<()> {
        for (name, a) in [
            ("key_valid", &self.key_valid),
            ("doc_start", &self.doc_start),
        ] {
            if let Some(a) = a {
                if a.dims() != [b, tk] {
                    candle_core::bail!(
                        "attention mask: {name} has shape {:?}, expected [{b}, {tk}] ([B, Tk])",
                        a.dims()
                    );
                }
            }
        }
        Ok(())
    }

    /// The additive mask slice `[B or 1, 1, rows, kw]` (0 visible, −inf hidden; `dtype`) of query
    /// rows `r0..r0 + rows` and keys `k0..k0 + kw` of a call with `t` queries and `tk` keys. Memory
    /// is O(rows · kw); the whole call's mask is never formed.
    pub fn additive(
        &self,
        (r0, rows): (usize, usize),
        (k0, kw): (usize, usize),
        (t, tk): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if tk < t || r0 + rows > t || k0 + kw > tk {
            candle_core::bail!(
                "attention mask: rows {r0}+{rows} / keys {k0}+{kw} outside t {t}, tk {tk}"
            );
        }
        let off = tk - t;
        let q = Tensor::arange((off + r0) as u32, (off + r0 + rows) as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((rows, 1))?;
        let k = Tensor::arange(k0 as u32, (k0 + kw) as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((1, kw))?;
        let mut allowed = k.broadcast_le(&q)?; // [rows, kw] u8
        if let Some(w) = self.window {
            let inside = (&k + w as f64)?.broadcast_gt(&q)?;
            allowed = (allowed * inside)?;
        }
        let mut allowed = allowed.reshape((1, 1, rows, kw))?;
        if let Some(ds) = &self.doc_start {
            let b = ds.dim(0)?;
            let starts = ds
                .narrow(1, off + r0, rows)?
                .to_dtype(DType::F32)?
                .reshape((b, 1, rows, 1))?;
            let after = k.reshape((1, 1, 1, kw))?.broadcast_ge(&starts)?;
            allowed = allowed.broadcast_mul(&after)?;
        }
        if let Some(kv) = &self.key_valid {
            let b = kv.dim(0)?;
            let keys = kv.narrow(1, k0, kw)?.ne(0f64)?.reshape((b, 1, 1, kw))?;
            allowed = allowed.broadcast_mul(&keys)?;
        }
        let shape = allowed.shape().clone();
        let zeros = Tensor::zeros(&shape, dtype, device)?;
        let neg = Tensor::full(f32::NEG_INFINITY, &shape, device)?.to_dtype(dtype)?;
        allowed.where_cond(&zeros, &neg)
    }
}

/// Query rows per chunk so that one chunk's `[B, nh, rows, tk]` scores stay within `budget`
/// elements (at least 1 row, at most `t`).
pub fn rows_per_chunk(nh: usize, t: usize, tk: usize, budget: usize) -> usize {
    (budget / (nh.max(1) * tk.max(1))).clamp(1, t.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Visibility written out element by element, independently of the tensor ops.
    fn dense(m: &KeyMask, b: usize, t: usize, tk: usize) -> Vec<f32> {
        let valid: Option<Vec<Vec<u8>>> = m.key_valid.as_ref().map(|x| x.to_vec2().unwrap());
        let ds: Option<Vec<Vec<u32>>> = m.doc_start.as_ref().map(|x| x.to_vec2().unwrap());
        let off = tk - t;
        let mut out = Vec::new();
        for bi in 0..b {
            for i in 0..t {
                let p = off + i;
                for j in 0..tk {
                    let ok = j <= p
                        && m.window.is_none_or(|w| j + w > p)
                        && valid.as_ref().is_none_or(|v| v[bi][j] != 0)
                        && ds.as_ref().is_none_or(|d| j >= d[bi][p] as usize);
                    out.push(if ok { 0.0 } else { f32::NEG_INFINITY });
                }
            }
        }
        out
    }

    #[test]
    fn slices_match_the_elementwise_rules() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, t, tk) = (2, 7, 9);
        let valid = Tensor::from_vec(
            vec![1u8, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0],
            (b, tk),
            &dev,
        )?;
        let ds = Tensor::from_vec(
            vec![0u32, 0, 0, 3, 3, 3, 3, 7, 7, 0, 0, 2, 2, 2, 2, 2, 2, 8],
            (b, tk),
            &dev,
        )?;
        for window in [None, Some(3)] {
            let m = KeyMask {
                window,
                key_valid: Some(valid.clone()),
                doc_start: Some(ds.clone()),
            };
            let want = dense(&m, b, t, tk);
            // whole call, and row/key slices reassembled
            let all = m.additive((0, t), (0, tk), (t, tk), DType::F32, &dev)?;
            assert_eq!(all.flatten_all()?.to_vec1::<f32>()?, want);
            let part = m.additive((2, 3), (1, 5), (t, tk), DType::F32, &dev)?;
            let got: Vec<Vec<Vec<f32>>> = part.squeeze(1)?.to_vec3()?;
            for bi in 0..b {
                for (ri, row) in got[bi].iter().enumerate() {
                    for (ki, x) in row.iter().enumerate() {
                        let w = want[(bi * t + 2 + ri) * tk + 1 + ki];
                        assert_eq!(*x, w, "b {bi} row {} key {}", 2 + ri, 1 + ki);
                    }
                }
            }
            // causal only: one row of mask for every batch row
            let c = KeyMask::causal(window);
            let cm = c.additive((0, t), (0, tk), (t, tk), DType::F32, &dev)?;
            assert_eq!(cm.dims(), [1, 1, t, tk]);
            assert_eq!(cm.flatten_all()?.to_vec1::<f32>()?, dense(&c, 1, t, tk));
        }
        Ok(())
    }

    #[test]
    fn chunk_rows_bound_the_scores() {
        assert_eq!(rows_per_chunk(64, 131_072, 131_072, 1 << 26), 8);
        assert_eq!(rows_per_chunk(4, 10, 10, 1 << 26), 10);
        assert_eq!(rows_per_chunk(64, 100, 1 << 30, 1 << 26), 1);
    }
}
