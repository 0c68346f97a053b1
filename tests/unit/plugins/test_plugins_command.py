"""``moe-lightning plugins`` goes through the CLI's subcommand table to the plugin listing."""

from moe_lightning.cli import main


def test_plugins_command_lists_the_shipped_deepspeed_plugin(capsys):
    main(["plugins"])
    # Installed or not, the shipped plugin is listed by name (with its registrations, or with the install command).
    assert "deepspeed" in capsys.readouterr().out
