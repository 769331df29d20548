//! The CUDA launchers and custom ops of [`super::down_proj`], [`super::expert_delta`] and
//! [`super::up_add`]; the kernels' source is [`src`].

mod src;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use std::sync::Arc;

use crate::nvrtc::{contiguous_range, Kernels};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use super::MAX_RANK;

use src::SRC;

pub(crate) static KERNELS: Kernels = Kernels::new("gptoss_lora_down", SRC);

/// Rows per thread of the `lora_up_add` kernels (`UPW` there).
const UP_ROWS: usize = 8;

/// Whether the kernels take `x`, `a`: CUDA, x f32/bf16 `[N, in]`, a f32 `[r ≤ MAX_RANK, in]`,
/// `in` a multiple of 4.
pub(super) fn takes(x: &Tensor, a: &Tensor) -> Result<bool> {
    if !x.device().is_cuda() || x.rank() != 2 || a.rank() != 2 {
        return Ok(false);
    }
    let (_, in_dim) = x.dims2()?;
    let (r, a_in) = a.dims2()?;
    Ok(matches!(x.dtype(), DType::F32 | DType::BF16)
        && a.dtype() == DType::F32
        && a_in == in_dim
        && in_dim % 4 == 0
        && (1..=MAX_RANK).contains(&r))
}

/// Whether [`super::up_add`]'s kernel takes these operands: CUDA, base f32/bf16 with `out`
/// (a multiple of 4) columns, h f32 `[N, r ≤ MAX_RANK]` for base's N rows, b f32 `[out, r]`, a
/// frozen bias.
pub(super) fn takes_up(
    base: &Tensor,
    bias: Option<&Tensor>,
    h: &Tensor,
    b: &Tensor,
) -> Result<bool> {
    if !base.device().is_cuda() || h.rank() != 2 || b.rank() != 2 {
        return Ok(false);
    }
    let (out, r) = b.dims2()?;
    let (n, hr) = h.dims2()?;
    Ok(matches!(base.dtype(), DType::F32 | DType::BF16)
        && h.dtype() == DType::F32
        && b.dtype() == DType::F32
        && hr == r
        && (1..=MAX_RANK).contains(&r)
        && base.dims().last() == Some(&out)
        && base.elem_count() == n * out
        && out % 4 == 0
        && base.layout().start_offset() % 4 == 0
        && bias.is_none_or(|t| !t.track_op() && t.dims() == [out]))
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("LoRA kernels: {what} = {v} > i32")))
}

/// A contiguous view's start, required to be a multiple of 4 elements (the 8/16-byte loads).
fn start4(l: &Layout, what: &str) -> Result<(usize, usize)> {
    let (a, b) = contiguous_range(l, what)?;
    if a % 4 != 0 {
        candle_core::bail!("LoRA kernels: {what} starts at element {a}, not a multiple of 4");
    }
    Ok((a, b))
}

fn cfg(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows grouped by weight block — the experts of one MoE call — on the device: the kernels'
/// grouped forms pick each row's `[r, in]` block and reduce per block.
pub(crate) struct Group {
    /// Block of each row, `[M]` u32.
    rows: Tensor,
    /// `[row0, row1)` of each split of a block's rows, grouped by block, `[2S]` u32.
    splits: Tensor,
    /// Block e's splits are `seg[e] .. seg[e + 1]`, `[E + 1]` u32.
    seg: Tensor,
}

/// Rows per split of the grouped reductions.
const SPLIT_ROWS: usize = 64;

impl Group {
    /// From `(block, first row, rows)` spans tiling `0..m` in order (blocks `< blocks`), in one
    /// host→device copy.
    pub(crate) fn new(
        spans: &[(usize, usize, usize)],
        m: usize,
        blocks: usize,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let mut rows = Vec::with_capacity(m);
        let mut per_block: Vec<Vec<u32>> = vec![Vec::new(); blocks];
        let mut next = 0usize;
        for &(e, off, len) in spans {
            if e >= blocks || off != next {
                candle_core::bail!(
                    "grouped LoRA: span ({e}, {off}, {len}) does not continue row {next} with a \
                     block below {blocks}"
                );
            }
            rows.extend(std::iter::repeat_n(e as u32, len));
            let mut r0 = off;
            while r0 < off + len {
                let r1 = (r0 + SPLIT_ROWS).min(off + len);
                per_block[e].extend([r0 as u32, r1 as u32]);
                r0 = r1;
            }
            next = off + len;
        }
        if next != m {
            candle_core::bail!("grouped LoRA: spans cover {next} rows, x has {m}");
        }
        let mut splits = Vec::new();
        let mut seg = Vec::with_capacity(blocks + 1);
        for b in &per_block {
            seg.push((splits.len() / 2) as u32);
            splits.extend_from_slice(b);
        }
        seg.push((splits.len() / 2) as u32);
        let (nr, ns) = (rows.len(), splits.len());
        let mut all = rows;
        all.extend(splits);
        all.extend(seg);
        let all = Tensor::from_vec(all, nr + ns + blocks + 1, dev)?;
        Ok(Self {
            rows: all.narrow(0, 0, nr)?,
            splits: all.narrow(0, nr, ns)?,
            seg: all.narrow(0, nr + ns, blocks + 1)?,
        })
    }

    /// Number of weight blocks E.
    fn blocks(&self) -> usize {
        self.seg.elem_count() - 1
    }

    /// Number of row splits S.
    fn n_splits(&self) -> usize {
        self.splits.elem_count() / 2
    }
}

/// The device view of a u32 tensor (the group's maps).
fn u32_view<'a>(
    g: &'a candle_core::StorageRef<'a>,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>> {
    let candle_core::Storage::Cuda(c) = &**g else {
        candle_core::bail!("grouped LoRA: {what} is not on a CUDA device");
    };
    let (a, b) = contiguous_range(l, what)?;
    Ok(c.as_cuda_slice::<u32>()?.slice(a..b))
}

/// The device view of an f32 or bf16 operand (elements `range`) and its kernel-name suffix.
enum FloatView<'a> {
    F32(CudaView<'a, f32>),
    BF16(CudaView<'a, half::bf16>),
}

impl<'a> FloatView<'a> {
    fn of(s: &'a CudaStorage, (a, b): (usize, usize), what: &str) -> Result<Self> {
        Ok(match &s.slice {
            CudaStorageSlice::F32(v) => Self::F32(v.slice(a..b)),
            CudaStorageSlice::BF16(v) => Self::BF16(v.slice(a..b)),
            _ => candle_core::bail!("LoRA kernels: {what} must be f32 or bf16"),
        })
    }

    /// `f32` or `bf16`, as the kernels' names end.
    fn suffix(&self) -> &'static str {
        match self {
            Self::F32(_) => "f32",
            Self::BF16(_) => "bf16",
        }
    }

    /// Pushes the view as the next kernel argument.
    fn push(&'a self, b: &mut LaunchArgs<'a>) {
        match self {
            Self::F32(v) => b.arg(v),
            Self::BF16(v) => b.arg(v),
        };
    }
}

/// The arguments after the three pointers shared by the forward and dx kernels:
/// `(n, in, r, scale, blk)`, `blk` the group's row map or a null pointer.
fn push_tail<'a>(
    b: &mut LaunchArgs<'a>,
    (n, in_dim, r): &'a (i32, i32, i32),
    scale: &'a f32,
    blk: &'a Option<CudaView<'a, u32>>,
    null: &'a u64,
) {
    b.arg(n);
    b.arg(in_dim);
    b.arg(r);
    b.arg(scale);
    match blk {
        Some(v) => b.arg(v),
        None => b.arg(null),
    };
}

/// `h = (x·scale)·a_rowᵀ` `[N, r]` f32; ungrouped `a` is `[r, in]`, grouped `[E·r, in]`.
fn launch_fwd(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    group: Option<&Group>,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (n, in_dim) = xl.shape().dims2()?;
    let (a_rows, _) = wl.shape().dims2()?;
    let r = a_rows / group.map_or(1, Group::blocks).max(1);
    let (x0, x1) = start4(xl, "x")?;
    let (a0, a1) = start4(wl, "a")?;
    let dev = xs.device().clone();
    let stream = dev.cuda_stream();
    let CudaStorageSlice::F32(aw) = &ws.slice else {
        candle_core::bail!("lora_down_fwd: a must be f32");
    };
    let av = aw.slice(a0..a1);
    // SAFETY: the kernel writes every one of the n·r outputs.
    let mut h = unsafe { dev.alloc::<f32>(n * r)? };
    let dims = (int(n, "N")?, int(in_dim, "in")?, int(r, "r")?);
    let guard = group.map(|g| g.rows.storage_and_layout());
    if n > 0 && group.is_none() && r <= 8 && in_dim % 8 == 0 && x0 % 8 == 0 {
        launch_fwd_split(xs, (x0, x1), &av, &mut h, dims, scale)?;
    } else if n > 0 {
        let blk = match &guard {
            Some((st, l)) => Some(u32_view(st, l, "rows")?),
            None => None,
        };
        let (gs, null) = (if blk.is_some() { "_g" } else { "" }, 0u64);
        let xv = FloatView::of(xs, (x0, x1), "x")?;
        let func = KERNELS.func(&dev, &format!("lora_down_fwd{gs}_{}", xv.suffix()))?;
        let mut b = stream.launch_builder(&func);
        xv.push(&mut b);
        b.arg(&av);
        b.arg(&mut h);
        push_tail(&mut b, &dims, &scale, &blk, &null);
        // SAFETY: argument types and order match the kernel; x holds n·in values, a (E·)r·in,
        // h n·r, rows n block indices below E; 8 warps per 4 rows.
        unsafe { b.launch(cfg(n.div_ceil(4), 256)) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(h, dev), Shape::from((n, r))))
}

/// Inputs per split of `lora_down_fwd_split` (`SPLIT_IN` there).
const SPLIT_IN: usize = 256;

/// The ungrouped forward for `r ≤ 8` (`in` and x's start multiples of 8): partial sums per
/// `SPLIT_IN` inputs, then their sum in split order, into `h` `[N, r]`.
fn launch_fwd_split(
    xs: &CudaStorage,
    (x0, x1): (usize, usize),
    av: &CudaView<'_, f32>,
    h: &mut CudaSlice<f32>,
    (n, in_dim, r): (i32, i32, i32),
    scale: f32,
) -> Result<()> {
    let dev = xs.device().clone();
    let stream = dev.cuda_stream();
    let (nu, ru) = (n as usize, r as usize);
    let splits = (in_dim as usize).div_ceil(SPLIT_IN);
    // SAFETY: fwd_split writes every (split, row, j < r) partial.
    let mut part = unsafe { dev.alloc::<f32>(splits * nu * ru)? };
    let xv = FloatView::of(xs, (x0, x1), "x")?;
    let func = KERNELS.func(&dev, &format!("lora_down_fwd_split_{}", xv.suffix()))?;
    let mut b = stream.launch_builder(&func);
    xv.push(&mut b);
    b.arg(av).arg(&mut part);
    b.arg(&n).arg(&in_dim).arg(&r).arg(&scale);
    let c = LaunchConfig {
        grid_dim: (nu.div_ceil(32) as u32, splits as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and order match the kernel; x holds n·in values (rows 16-byte
    // aligned), a r·in, part splits·n·r.
    unsafe { b.launch(c) }.w()?;
    let func = KERNELS.func(&dev, "lora_down_fwd_sum")?;
    let (nr, si) = ((nu * ru) as u64, splits as i32);
    let mut b = stream.launch_builder(&func);
    b.arg(&part).arg(h).arg(&nr).arg(&si);
    // SAFETY: part holds splits·n·r values, h n·r.
    unsafe { b.launch(cfg((nu * ru).div_ceil(256), 256)) }.w()?;
    Ok(())
}

/// `out = (g·a_row)·scale` `[N, in]` in `dtype`; `g` `[N, r]` f32, `a` `[(E·)r, in]` f32.
fn launch_dx(
    gs: &CudaStorage,
    gl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    dtype: DType,
    group: Option<&Group>,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (n, r) = gl.shape().dims2()?;
    let (_, in_dim) = wl.shape().dims2()?;
    let (g0, g1) = contiguous_range(gl, "g")?;
    let (a0, a1) = start4(wl, "a")?;
    let dev = gs.device().clone();
    let stream = dev.cuda_stream();
    let (CudaStorageSlice::F32(gw), CudaStorageSlice::F32(aw)) = (&gs.slice, &ws.slice) else {
        candle_core::bail!("lora_down_dx: g and a must be f32");
    };
    let (gv, av) = (gw.slice(g0..g1), aw.slice(a0..a1));
    let dims = (int(n, "N")?, int(in_dim, "in")?, int(r, "r")?);
    // one thread per 4 outputs of 4 rows
    let quads = n.div_ceil(4) * (in_dim / 4);
    let guard = group.map(|g| g.rows.storage_and_layout());
    let blk = match &guard {
        Some((st, l)) => Some(u32_view(st, l, "rows")?),
        None => None,
    };
    let (gsfx, null) = (if blk.is_some() { "_g" } else { "" }, 0u64);
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            // SAFETY: the kernel writes every one of the n·in outputs.
            let mut o = unsafe { dev.alloc::<$t>(n * in_dim)? };
            if quads > 0 {
                let func = KERNELS.func(&dev, &format!("lora_down_dx{gsfx}_{}", $name))?;
                let mut b = stream.launch_builder(&func);
                b.arg(&gv);
                b.arg(&av);
                b.arg(&mut o);
                push_tail(&mut b, &dims, &scale, &blk, &null);
                // SAFETY: argument types and order match the kernel; one thread per 4
                // outputs of 4 rows; rows holds n block indices below E.
                unsafe { b.launch(cfg(quads.div_ceil(256), 256)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(o, dev.clone())
        }};
    }
    let out = match dtype {
        DType::F32 => run!(f32, "f32"),
        DType::BF16 => run!(half::bf16, "bf16"),
        d => candle_core::bail!("lora_down_dx: unsupported dtype {d:?}"),
    };
    Ok((out, Shape::from((n, in_dim))))
}

/// `gᵀ·(x·scale)` f32: `[r, in]`, or grouped `[E·r, in]` summing each block's rows only.
fn launch_da(
    gs: &CudaStorage,
    gl: &Layout,
    xs: &CudaStorage,
    xl: &Layout,
    group: Option<&Group>,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (n, r) = gl.shape().dims2()?;
    let (_, in_dim) = xl.shape().dims2()?;
    let (g0, g1) = contiguous_range(gl, "g")?;
    let (x0, x1) = contiguous_range(xl, "x")?;
    let dev = gs.device().clone();
    let stream = dev.cuda_stream();
    let CudaStorageSlice::F32(gw) = &gs.slice else {
        candle_core::bail!("lora_down_da: g must be f32");
    };
    let gv = gw.slice(g0..g1);
    let cols = in_dim.div_ceil(256);
    let blocks = group.map_or(1, Group::blocks);
    let (splits, per) = match group {
        Some(g) => (g.n_splits(), 0),
        None => {
            // about four blocks per SM of an H100/H200, at least 32 rows each
            let s = (528 / cols.max(1)).clamp(1, n.div_ceil(32).max(1));
            (s, n.div_ceil(s).max(1))
        }
    };
    let ri = r * in_dim;
    // SAFETY: da_part writes every partial of the splits·r·in.
    let mut part = unsafe { dev.alloc::<f32>(splits.max(1) * ri)? };
    // SAFETY: da_sum(_seg) writes every one of the blocks·r·in outputs.
    let mut da = unsafe { dev.alloc::<f32>(blocks * ri)? };
    let (ni, ii, rr, pi, si) = (
        int(n, "N")?,
        int(in_dim, "in")?,
        int(r, "r")?,
        int(per, "rows")?,
        int(splits, "splits")?,
    );
    let guards = group.map(|g| (g.splits.storage_and_layout(), g.seg.storage_and_layout()));
    let maps = match &guards {
        Some(((sp, spl), (sg, sgl))) => {
            Some((u32_view(sp, spl, "splits")?, u32_view(sg, sgl, "seg")?))
        }
        None => None,
    };
    let (gsfx, null) = (if maps.is_some() { "_g" } else { "" }, 0u64);
    if ri > 0 && splits > 0 {
        let xv = FloatView::of(xs, (x0, x1), "x")?;
        let func = KERNELS.func(&dev, &format!("lora_down_da_part{gsfx}_{}", xv.suffix()))?;
        let mut b = stream.launch_builder(&func);
        b.arg(&gv);
        xv.push(&mut b);
        b.arg(&mut part);
        b.arg(&ni).arg(&ii).arg(&rr).arg(&pi).arg(&scale);
        match &maps {
            Some((sp, _)) => b.arg(sp),
            None => b.arg(&null),
        };
        let c = LaunchConfig {
            grid_dim: (cols as u32, splits as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match the kernel; g holds n·r, x n·in, part
        // splits·r·in values; the splits lie inside 0..n.
        unsafe { b.launch(c) }.w()?;
    }
    if blocks * ri > 0 {
        let ri64 = ri as u64;
        match &maps {
            Some((_, seg)) => {
                let func = KERNELS.func(&dev, "lora_down_da_sum_seg")?;
                let bi = int(blocks, "E")?;
                let mut b = stream.launch_builder(&func);
                b.arg(&part);
                b.arg(&mut da);
                b.arg(seg);
                b.arg(&bi);
                b.arg(&ri64);
                // SAFETY: argument types and order match the kernel; seg holds E + 1
                // split offsets into part.
                unsafe { b.launch(cfg((blocks * ri).div_ceil(256), 256)) }.w()?;
            }
            None => {
                let func = KERNELS.func(&dev, "lora_down_da_sum")?;
                let mut b = stream.launch_builder(&func);
                b.arg(&part);
                b.arg(&mut da);
                b.arg(&si);
                b.arg(&ri64);
                // SAFETY: argument types and order match the kernel; part holds
                // splits·r·in values.
                unsafe { b.launch(cfg(ri.div_ceil(256), 256)) }.w()?;
            }
        }
    }
    Ok((
        CudaStorage::wrap_cuda_slice(da, dev),
        Shape::from((blocks * r, in_dim)),
    ))
}

/// `round(round(base + bias) + (h·bᵀ)·scale)` `[N, out]` in base's dtype: `base` `[N, out]`, `h`
/// `[N, r]` f32, `b` `[out, r]` f32, `bias` `[out]` in base's dtype.
fn launch_up_add(
    base: (&CudaStorage, &Layout),
    h: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    bias: Option<&Tensor>,
    scale: f32,
) -> Result<CudaStorage> {
    let (n, cols) = base.1.shape().dims2()?;
    let (_, r) = b.1.shape().dims2()?;
    let (b0, b1) = start4(base.1, "base")?;
    let (h0, h1) = contiguous_range(h.1, "h")?;
    let (w0, w1) = contiguous_range(b.1, "b")?;
    let dev = base.0.device().clone();
    let stream = dev.cuda_stream();
    let (CudaStorageSlice::F32(hw), CudaStorageSlice::F32(bw)) = (&h.0.slice, &b.0.slice) else {
        candle_core::bail!("lora_up_add: h and b must be f32");
    };
    let (hv, bv) = (hw.slice(h0..h1), bw.slice(w0..w1));
    let guard = bias.map(|t| t.storage_and_layout());
    let dims = (int(n, "N")?, int(cols, "out")?, int(r, "r")?);
    if r > 16 {
        candle_core::bail!("lora_up_add: rank {r} above the kernels' 16");
    }
    // one thread per 4 outputs of UP_ROWS rows
    let quads = n.div_ceil(UP_ROWS) * (cols / 4);
    let sfx = match (r <= 8, guard.is_some()) {
        (true, true) => "8_bias",
        (true, false) => "8",
        (false, true) => "16_bias",
        (false, false) => "16",
    };
    macro_rules! run {
        ($s:expr, $t:ty, $name:literal, $slice:path) => {{
            let bias_view = match &guard {
                Some((st, l)) => {
                    let candle_core::Storage::Cuda(c) = &**st else {
                        candle_core::bail!("lora_up_add: the bias is not on the CUDA device");
                    };
                    let (a, e) = contiguous_range(l, "bias")?;
                    let $slice(v) = &c.slice else {
                        candle_core::bail!("lora_up_add: the bias dtype differs from base");
                    };
                    Some(v.slice(a..e))
                }
                None => None,
            };
            let bv0 = $s.slice(b0..b1);
            // SAFETY: the kernel writes every one of the n·cols outputs.
            let mut o = unsafe { dev.alloc::<$t>(n * cols)? };
            if quads > 0 {
                let func = KERNELS.func(&dev, &format!("lora_up_add{sfx}_{}", $name))?;
                let mut lb = stream.launch_builder(&func);
                lb.arg(&bv0);
                match &bias_view {
                    Some(v) => lb.arg(v),
                    None => lb.arg(&bv0),
                };
                lb.arg(&hv).arg(&bv).arg(&mut o);
                lb.arg(&dims.0).arg(&dims.1).arg(&dims.2).arg(&scale);
                // SAFETY: argument types and order match the kernel; base and out hold n·cols,
                // h n·r, b cols·r, bias cols values; one thread per 4 outputs of 8 rows.
                unsafe { lb.launch(cfg(quads.div_ceil(256), 256)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(o, dev.clone())
        }};
    }
    Ok(match &base.0.slice {
        CudaStorageSlice::F32(s) => run!(s, f32, "f32", CudaStorageSlice::F32),
        CudaStorageSlice::BF16(s) => run!(s, half::bf16, "bf16", CudaStorageSlice::BF16),
        _ => candle_core::bail!("lora_up_add: base must be f32 or bf16"),
    })
}

/// [`super::up_add`] on CUDA: args `(base [N, out], h [N, r] f32, b [out, r] f32)`. Backward:
/// `∂base = ∂out`; with `∂d = f32(∂out)·scale + 0` (one kernel), `∂h = ∂d·b` and `∂b = ∂dᵀ·h`
/// (f32 matmuls, as the composition's backward runs them).
pub(super) struct UpAddOp {
    pub(super) bias: Option<Tensor>,
    pub(super) scale: f32,
}

impl CustomOp3 for UpAddOp {
    fn name(&self) -> &'static str {
        "lora_up_add"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("lora_up_add: CUDA only (the CPU uses the candle ops)")
    }

    fn cuda_fwd(
        &self,
        base: &CudaStorage,
        bl: &Layout,
        h: &CudaStorage,
        hl: &Layout,
        b: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = launch_up_add((base, bl), (h, hl), (b, wl), self.bias.as_ref(), self.scale)?;
        Ok((out, bl.shape().clone()))
    }

    fn bwd(
        &self,
        _base: &Tensor,
        h: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // ∂(h·bᵀ) = f32(∂out)·scale + 0, as add_scaled_delta's backward gives it, then the two
        // f32 products of the matmul's backward
        let g = g.contiguous()?;
        let gd = crate::scaled_delta_grad(&g, self.scale)?;
        let dh = gd.matmul(&b.detach())?;
        let db = gd.t()?.matmul(&h.detach())?;
        Ok((Some(g), Some(dh), Some(db)))
    }
}

/// Implements `CustomOp2` for a launcher (`$name`, CUDA only), with an optional backward.
macro_rules! cuda_op2 {
    (
        $op:ty, $name:literal, |$s:ident, $a:ident, $al:ident, $b:ident, $bl:ident| $body:expr
        $(, bwd |$bs:ident, $x:ident, $y:ident, $g:ident| $bwd:expr)?
    ) => {
        impl CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                candle_core::bail!(concat!($name, ": CUDA only (the CPU uses the candle ops)"))
            }

            fn cuda_fwd(
                &$s,
                $a: &CudaStorage,
                $al: &Layout,
                $b: &CudaStorage,
                $bl: &Layout,
            ) -> Result<(CudaStorage, Shape)> {
                $body
            }

            $(
                fn bwd(
                    &$bs,
                    $x: &Tensor,
                    $y: &Tensor,
                    _res: &Tensor,
                    $g: &Tensor,
                ) -> Result<(Option<Tensor>, Option<Tensor>)> {
                    $bwd
                }
            )?
        }
    };
}

/// `h = (x·scale)·a_rowᵀ` `[N, r]` f32: args `(x [N, in], a [(E·)r, in] f32)`. Backward:
/// `∂x = (∂h·a_row)·scale` in x's dtype, `∂a = ∂hᵀ·(x·scale)` (per block when grouped).
pub(super) struct FwdOp {
    pub(super) group: Option<Arc<Group>>,
    pub(super) scale: f32,
}
cuda_op2!(
    FwdOp,
    "lora_down_fwd",
    |self, x, xl, a, al| launch_fwd(x, xl, a, al, self.group.as_deref(), self.scale),
    bwd | self,
    x,
    a,
    g | {
        let g = g.contiguous()?;
        let (group, scale) = (self.group.clone(), self.scale);
        let dx = g.apply_op2_no_bwd(
            a,
            &DxOp {
                dtype: x.dtype(),
                group: group.clone(),
                scale,
            },
        )?;
        let da = g.apply_op2_no_bwd(x, &DaOp { group, scale })?;
        Ok((Some(dx), Some(da)))
    }
);

/// `y = (h·a_row)·scale` `[N, in]` in `dtype`: args `(h [N, r] f32, a [(E·)r, in] f32)` — the
/// `∂x` of [`FwdOp`], and the expert LoRA's up projection `h·B_eᵀ`. Backward:
/// `∂h = (∂y·scale)·a_rowᵀ` ([`FwdOp`]), `∂a = hᵀ·(∂y·scale)` (per block when grouped).
pub(super) struct DxOp {
    pub(super) dtype: DType,
    pub(super) group: Option<Arc<Group>>,
    pub(super) scale: f32,
}
cuda_op2!(
    DxOp,
    "lora_down_dx",
    |self, g, gl, a, al| launch_dx(g, gl, a, al, self.dtype, self.group.as_deref(), self.scale),
    bwd | self,
    h,
    a,
    dy | {
        let dy = dy.contiguous()?;
        let (group, scale) = (self.group.clone(), self.scale);
        let dh = dy.apply_op2_no_bwd(
            a,
            &FwdOp {
                group: group.clone(),
                scale,
            },
        )?;
        let da = h.apply_op2_no_bwd(&dy, &DaOp { group, scale })?;
        Ok((Some(dh), Some(da)))
    }
);

/// `gᵀ·(x·scale)` f32 (per block when grouped): args `(g [N, r] f32, x [N, in])`.
struct DaOp {
    group: Option<Arc<Group>>,
    scale: f32,
}
cuda_op2!(DaOp, "lora_down_da", |self, g, gl, x, xl| launch_da(
    g,
    gl,
    x,
    xl,
    self.group.as_deref(),
    self.scale
));
