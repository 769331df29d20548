//! Render dataset rows (JSONL with a `messages` column) as gpt-oss sees them: the tool to debug
//! a prompt or a training example.
//!
//! ```text
//! cargo run --release --example render -- rows.jsonl --date 2026-11-28
//! cargo run --release --example render -- rows.jsonl --format ids --mask assistant
//! echo '{"messages":[{"role":"user","content":"Hi"}]}' | cargo run --release --example render -- - --mode completion
//! ```
//! HF mode (default) is the official chat template, as TRL trains; `--harmony` renders with
//! openai-harmony's rules instead.

use std::io::{BufRead, BufReader, Read};

use clap::{Parser, ValueEnum};
use gptoss::harmony::hf::{self, ChatTemplateOptions};
use gptoss::harmony::{
    render_for_completion, render_for_training, HarmonyTokenizer, LossMaskMode, ReasoningEffort,
    RenderOptions, Role,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// The whole row; the last assistant turn ends in <|return|>.
    Training,
    /// A generation prompt: a trailing assistant turn is dropped and `<|start|>assistant` appended.
    Completion,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    /// The rendered text.
    Text,
    /// Token ids, space separated.
    Ids,
    /// `{"ids": [...], "mask": [...]}` per row.
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mask {
    All,
    Assistant,
    Final,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Effort {
    Low,
    Medium,
    High,
}

#[derive(Parser, Debug)]
#[command(about = "Render JSONL rows with a `messages` column as gpt-oss sees them")]
struct Args {
    /// JSONL file, or `-` for stdin.
    input: String,
    #[arg(long, value_enum, default_value = "training")]
    mode: Mode,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Conversation date (the template's "Current date").
    #[arg(long, default_value = "2026-11-28")]
    date: String,
    #[arg(long, value_enum)]
    reasoning_effort: Option<Effort>,
    #[arg(long)]
    model_identity: Option<String>,
    /// Render with openai-harmony's rules instead of the HF chat template.
    #[arg(long)]
    harmony: bool,
    /// Loss mask for `--format json`.
    #[arg(long, value_enum, default_value = "all")]
    mask: Mask,
    /// A Hugging Face tokenizer.json to use instead of the built-in o200k_harmony.
    #[arg(long)]
    tokenizer: Option<String>,
}

fn main() -> std::process::ExitCode {
    gptoss::cli::run(|| run().map(|()| gptoss::cli::Outcome::Done))
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let tok = match &args.tokenizer {
        Some(p) => HarmonyTokenizer::from_file(p)?,
        None => HarmonyTokenizer::o200k_harmony()?,
    };
    let mut opts = ChatTemplateOptions::new(args.date.clone());
    opts.model_identity = args.model_identity.clone();
    opts.reasoning_effort = args.reasoning_effort.map(|e| match e {
        Effort::Low => ReasoningEffort::Low,
        Effort::Medium => ReasoningEffort::Medium,
        Effort::High => ReasoningEffort::High,
    });
    let mask_mode = match args.mask {
        Mask::All => LossMaskMode::All,
        Mask::Assistant => LossMaskMode::AssistantOnly,
        Mask::Final => LossMaskMode::FinalOnly,
    };
    let reader: Box<dyn Read> = if args.input == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(&args.input).map_err(|e| format!("{}: {e}", args.input))?)
    };
    for (n, line) in BufReader::new(reader).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("line {}: {e}", n + 1))?;
        let mut messages =
            hf::messages_from_row(&row).map_err(|e| format!("line {}: {e}", n + 1))?;
        let mut row_opts = opts.clone();
        if let Mode::Completion = args.mode {
            if messages.last().is_some_and(|m| m.role == "assistant") {
                messages.pop();
            }
            row_opts.add_generation_prompt = true;
        }
        if let Some(tools) = row.get("tools").and_then(|t| t.as_array()) {
            row_opts.tools = Some(tools.clone());
        }
        let ids = if args.harmony {
            let conv = hf::to_harmony_conversation(&messages, &row_opts)?;
            match args.mode {
                Mode::Training => {
                    render_for_training(&tok, &conv, &RenderOptions::keep_analysis())?
                }
                Mode::Completion => {
                    render_for_completion(&tok, &conv, Role::Assistant, &RenderOptions::default())?
                }
            }
        } else {
            hf::render_ids(&tok, &messages, &row_opts)?
        };
        match args.format {
            Format::Text => println!("{}", tok.decode_lossy(&ids)?),
            Format::Ids => println!(
                "{}",
                ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
            ),
            Format::Json => {
                let mask = gptoss::harmony::loss_mask(&tok, &ids, mask_mode);
                println!("{}", serde_json::json!({"ids": ids, "mask": mask}));
            }
        }
    }
    Ok(())
}
