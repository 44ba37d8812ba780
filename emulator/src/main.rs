//! `dataverse-emulator [--port N]`: runs the emulator until interrupted.

use dataverse_emulator::{Emulator, EmulatorOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut port = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                port = args
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| std::io::Error::other("--port needs a number"))?;
            }
            "-h" | "--help" => {
                println!("usage: dataverse-emulator [--port N]");
                return Ok(());
            }
            other => return Err(std::io::Error::other(format!("unknown argument `{other}`"))),
        }
    }
    let options = EmulatorOptions::default();
    let emulator = Emulator::start_on(([127, 0, 0, 1], port).into(), options.clone()).await?;
    println!("Dataverse emulator");
    println!("  organisation URL: {}", emulator.org_url());
    println!("  Web API:          {}", emulator.api_base());
    println!("  token endpoint:   {}", emulator.token_url());
    println!("  tenant id:        {}", options.tenant_id);
    println!("  client id:        {}", options.client_id);
    println!("  client secret:    {} (test value)", options.client_secret);
    tokio::signal::ctrl_c().await?;
    drop(emulator);
    Ok(())
}
