"""Tools that sit on top of the runtime: `dsinfer bench` (dsinfer.tools.bench) and the trainer of the built-in
model (dsinfer.tools.train). Nothing in the runtime (`import dsinfer`, the engine, the server) imports this
package; the command line imports it inside the commands that need it."""
