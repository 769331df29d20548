//! Shapes of packed MXFP4 tensors and of their dequantized outputs.

use crate::error::{Mxfp4Error, Result};
use crate::format::{BLOCK_BYTES, BLOCK_VALUES};

/// Where the dequantized values go.
///
/// For packed `blocks [..., rows, cols/32, 16]`:
/// - [`Layout::Checkpoint`]: `[..., rows, cols]`, the natural order of the checkpoint
///   (`[E, out, in]` for gpt-oss experts).
/// - [`Layout::Transposed`]: the last two dimensions swapped, `[..., cols, rows]`. For gpt-oss
///   expert tensors (`[E, out, in/32, 16]`) this is the transformers parameter layout
///   `[E, in, out]` that `convert_moe_packed_tensors` (reshape + `transpose(1, 2)`) returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// `[..., rows, cols]`.
    #[default]
    Checkpoint,
    /// `[..., cols, rows]` (last two dimensions swapped).
    Transposed,
}

/// The validated geometry of one packed MXFP4 tensor.
///
/// `blocks [..prefix, rows, groups, 16]`, `scales [..prefix, rows, groups]`, `cols = groups · 32`.
/// The prefix may be empty (a plain matrix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mxfp4Shape {
    prefix: Vec<usize>,
    rows: usize,
    groups: usize,
}

impl Mxfp4Shape {
    /// Checks a pair of blocks/scales shapes and returns the geometry.
    ///
    /// `name` names the blocks tensor in errors (e.g. a checkpoint key); the scales tensor is
    /// called `<name>` with `_blocks` replaced by `_scales` (or `<name>.scales`).
    ///
    /// # Errors
    /// [`Mxfp4Error::ShapeMismatch`] when blocks have fewer than 3 dimensions or a last dimension
    /// other than 16, or when `scales` is not `blocks.shape[..-1]`.
    pub fn from_dims(blocks: &[usize], scales: &[usize], name: Option<&str>) -> Result<Self> {
        let (bname, sname) = tensor_names(name);
        if blocks.len() < 3 || blocks[blocks.len() - 1] != BLOCK_BYTES {
            return Err(Mxfp4Error::ShapeMismatch {
                name: bname,
                actual: blocks.to_vec(),
                expected: "[..., rows, cols/32, 16] (at least 3 dims, last dim 16)".into(),
                other_name: sname,
                other: scales.to_vec(),
            });
        }
        let lead = &blocks[..blocks.len() - 1];
        if scales != lead {
            return Err(Mxfp4Error::ShapeMismatch {
                name: sname,
                actual: scales.to_vec(),
                expected: format!("blocks.shape[..-1] = {lead:?}"),
                other_name: bname,
                other: blocks.to_vec(),
            });
        }
        let n = lead.len();
        Ok(Self {
            prefix: lead[..n - 2].to_vec(),
            rows: lead[n - 2],
            groups: lead[n - 1],
        })
    }

    /// Geometry of a dense `[..prefix, rows, cols]` tensor to be quantized.
    ///
    /// # Errors
    /// [`Mxfp4Error::ShapeMismatch`] when it has fewer than 2 dimensions or `cols % 32 != 0`.
    pub fn from_dense_dims(dims: &[usize], name: Option<&str>) -> Result<Self> {
        let name = name.unwrap_or("weights").to_string();
        let n = dims.len();
        if n < 2 || dims[n - 1] % BLOCK_VALUES != 0 {
            return Err(Mxfp4Error::ShapeMismatch {
                name: name.clone(),
                actual: dims.to_vec(),
                expected: "[..., rows, cols] with cols a multiple of 32".into(),
                other_name: name,
                other: dims.to_vec(),
            });
        }
        Ok(Self {
            prefix: dims[..n - 2].to_vec(),
            rows: dims[n - 2],
            groups: dims[n - 1] / BLOCK_VALUES,
        })
    }

    /// Leading dimensions (`[E]` for expert tensors).
    pub fn prefix(&self) -> &[usize] {
        &self.prefix
    }
    /// Number of matrices: the product of the prefix dimensions (1 when empty).
    pub fn matrices(&self) -> usize {
        self.prefix.iter().product()
    }
    /// Rows of each matrix (`out` features for gpt-oss experts).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Blocks per row (`cols / 32`).
    pub fn groups(&self) -> usize {
        self.groups
    }
    /// Values per row (`groups · 32`; `in` features for gpt-oss experts).
    pub fn cols(&self) -> usize {
        self.groups * BLOCK_VALUES
    }
    /// Total number of blocks (= number of scale bytes).
    pub fn num_blocks(&self) -> usize {
        self.matrices() * self.rows * self.groups
    }
    /// Total number of values (= output elements).
    pub fn num_values(&self) -> usize {
        self.num_blocks() * BLOCK_VALUES
    }
    /// `[..., rows, groups, 16]`.
    pub fn blocks_dims(&self) -> Vec<usize> {
        let mut d = self.prefix.clone();
        d.extend([self.rows, self.groups, BLOCK_BYTES]);
        d
    }
    /// `[..., rows, groups]`.
    pub fn scales_dims(&self) -> Vec<usize> {
        let mut d = self.prefix.clone();
        d.extend([self.rows, self.groups]);
        d
    }
    /// `[..., rows, cols]`.
    pub fn dense_dims(&self) -> Vec<usize> {
        let mut d = self.prefix.clone();
        d.extend([self.rows, self.cols()]);
        d
    }
    /// Output dims for a layout: `[..., rows, cols]` or `[..., cols, rows]`.
    pub fn output_dims(&self, layout: Layout) -> Vec<usize> {
        let mut d = self.prefix.clone();
        match layout {
            Layout::Checkpoint => d.extend([self.rows, self.cols()]),
            Layout::Transposed => d.extend([self.cols(), self.rows]),
        }
        d
    }
}

/// Names used in errors for the blocks and scales tensors.
pub(crate) fn tensor_names(name: Option<&str>) -> (String, String) {
    match name {
        None => ("blocks".into(), "scales".into()),
        Some(n) => {
            let s = match n.strip_suffix("_blocks") {
                Some(stem) => format!("{stem}_scales"),
                None => format!("{n}.scales"),
            };
            (n.to_string(), s)
        }
    }
}
