use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kubeswarm: agent swarms of open-weight LLMs on your own GPUs, as Kubernetes objects.
#[derive(Parser)]
#[command(name = "kubeswarm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions, or write them into directories.
    ///
    /// Without --out the CRDs go to standard output as one multi-document YAML stream,
    /// ready for `kubectl apply -f -`.
    Crdgen {
        /// Directory to write one YAML file per CRD into; repeat for several.
        #[arg(long, value_name = "DIR")]
        out: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crdgen { out } => crdgen(&out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kubeswarm: {}", error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn crdgen(out: &[PathBuf]) -> Result<(), Box<dyn std::error::Error>> {
    let files = kubeswarm::crdgen::render()?;
    if out.is_empty() {
        let docs: Vec<&str> = files.iter().map(|f| f.yaml.as_str()).collect();
        print!("{}", docs.join("---\n"));
    }
    for dir in out {
        kubeswarm::crdgen::write(dir, &files)?;
    }
    Ok(())
}

/// One line with every cause, so an error names what failed and why.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
