//! `veto`: negative prompts that work on few-step diffusion models. Argument parsing and
//! printing only; the work is in the `veto` library.

mod arithmetic;
mod bench;
mod eval;
mod generate;
mod outputs;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "veto", version, about = "Negative prompts that work on few-step diffusion models (NAG, NASA, CFG)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image from a prompt, with a negative prompt that works.
    #[command(allow_negative_numbers = true)]
    Generate(Box<generate::GenerateArgs>),
    /// Time one denoising step of a random-weight model at the real width, per guidance method.
    Bench(bench::BenchArgs),
    /// Evaluate negative prompts on the demo model: negative- and positive-object rates and a
    /// quality proxy per guidance method and step count, judged by veto's deterministic judge.
    Eval(Box<eval::EvalArgs>),
}

fn main() {
    // Each layer's large buffers reuse the pages the previous layer freed (glibc).
    veto::allocator::reuse_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(*args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
