"""The bundled demo model's world: synthetic arithmetic chats (`data`) and their evaluation (`evaluate`)."""
