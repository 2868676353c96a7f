"""Built-in vocabulary for the synthesized demo corpus.

Common English words, chosen so that no two share a pronunciation (no "their"/"there",
"two"/"too"): sentences are random word sequences with no context to tell homophones apart, so a
homophone pair would put an error floor under the WER that has nothing to do with training.

``WORDS_ES`` is the same for the optional Spanish part of the corpus (``synth.second_language``):
common words whose spelling needs no accent or n-tilde (the default corpus's transcripts are a-z and
apostrophe, the models' default alphabet), with no pair that sounds alike under seseo, yeismo, b/v
or a silent h ("casa"/"caza", "hola"/"ola", "vaca"/"baca" have at most one member here), and none
spelled like an English word.

``WORDS_ES_ACCENTED`` is only used with written transcripts (``synth.punctuation``): common words
spelled with an accent, an n-tilde or a diaeresis (á é í ó ú ü ñ), under the same rules, checked
against ``WORDS_ES`` as well, and none equal to a ``WORDS_ES`` word once the marks are dropped (no
"papá" next to a "papa"; stress alone does not count as a different pronunciation here).
Interrogative "qué" and "dónde" are left out: "por qué" would sound like "porque", and "donde" is
in ``WORDS_ES``.
"""

WORDS: tuple[str, ...] = tuple("""
able about above across act add afraid after again against age ago agree air all almost alone
along already also always among animal answer any apple area arm army around art ask asleep
autumn away baby back bad bag ball bank basket bath beach bean bear beautiful because bed
before begin behind believe bell below best better between bicycle big bird birthday black blanket
blue boat body bone book borrow bottle bottom box boy brain branch brave bread breakfast bridge
bright bring broken brother brown build burn bus busy butter button cake call camera camp candle
captain car card care carry castle cat catch chair change cheap cheese chicken child chocolate
choose church circle city clean clever climb clock close cloud coat coffee cold collect colour come
common cook cool copy corner country cousin cover cow crazy cross crowd cry cup cut dance danger
dark daughter day dead decide deep desk different dinner dirty doctor dog dollar door down dragon
draw dream dress drink drive drop dry duck during early earth easy eat egg eight empty end enemy
engine enjoy enough evening every example expensive explain eye face fact fall family famous far
farm fast father favourite feather feel field fight finger finish fire first fish five floor
flower fly follow food foot forest forget fork free fresh friend frog front fruit full funny
future game garden gate gentle giant gift girl give glad glass gold good grass green ground group
grow guess guitar gun hair half hammer hand happy hard hat have head healthy heavy help hill
history hold holiday home honest hope horse hospital hot hotel hour house huge hungry hurry
husband ice idea important island jacket job join journey juice jump jungle just keep kettle key
kind king kitchen kite knife ladder lake lamp language large last late laugh lazy leaf learn leave
left leg lemon letter library light like lion listen little live long look lose loud love lucky
lunch machine magic map market matter maybe meat medicine middle milk minute mirror money monkey
month moon morning mother mountain mouse mouth move much music nature near neck never new news
next nice night nine noise north nose nothing number ocean office often old open orange other
outside over page paint paper parent park party pass past pencil people pepper perhaps person
piano picture pillow pink pizza place planet plant plate play pocket police poor potato pretty
prince problem promise pull purple push queen question quick quiet rabbit race radio rain rainbow
ready reason remember rice rich river road robot rock roof room round run sad safe salt same sand
sandwich save school science scissors season second secret seven shadow share sheep shirt shoe
short shoulder show sick silver simple sing sister sit six sky sleep slow small smell smile snake
snow soap soft soldier soon sorry soup south space speak special spider spoon spring square
station stone stop story strange street strong student study sugar summer sun supper sweet swim
table tail talk tall teacher team telephone tell ten thank thing think thirsty three ticket tiger
tired today together tomorrow tongue tonight tooth top town toy train travel tree trouble truck
true try turn twelve umbrella uncle under understand until usual valley vegetable village visit
voice wait walk wall want warm wash watch water week welcome west wet what wheel when white why
wide wife wild window winter wish without woman wonderful wood word work world worry yellow
yesterday young zebra zero
""".split())

WORDS_ES: tuple[str, ...] = tuple("""
abeja abierto abrazo abrigo abril abrir abuela abuelo aceite agosto agua aguja ahora ajo alegre
algo alguien almohada almuerzo alto alumno amargo amarillo amiga amigo amor ancho andar antes
aprender arena arriba arroz ayer ayudar azul bailar bajar ballena bandera barato barba barco barrio
bastante beber besar bicicleta blanco boca bolsa bolsillo bonito bosque botella brazo bueno buscar
caballo cabeza cabra cada caer caja calle cama camino camisa campo cansado cantar cara carne caro
carretera carta casa casi catorce cebolla cena cepillo cerca cerdo cerrar cerveza chaqueta chica
chico cielo cien ciencia cinco cincuenta ciudad claro clase clavo coche cocina cocinar comer comida
comprar con conejo conocer contar contento correr corto cosa crecer creer cuaderno cuadro cuarenta
cuarto cuatro cuchara cuchillo cuello cuento cuerda cuerpo culebra decir dedo dejar delgado dentro
deporte derecho desayuno desde desierto diciembre diente diez dinero dios doce domingo donde dormir
dulce duro edad ejemplo ella ellos empezar encontrar enero enfermera enfermo entrar entre equipo
escalera escoba escribir escuchar escuela espalda espejo esperar esquina estrella estudiar examen
falda familia febrero feliz feo fiesta flaco flor forma foto fresa fruta fuego fuera fuerte galleta
gallina ganar gato gente gordo gorra gracias grande gris grupo guerra gustar harina helado hermana
hermano hielo hija hijo hilo historia hoja hombre hombro hormiga hueso huevo iglesia invierno isla
juego jueves jugar juguete julio junio lado lago lavar leche lechuga leer lejos lengua lento libro
limpiar limpio listo llamar llave llegar lleno llevar llorar lluvia lobo loco luego lugar luna
lunes luz madera madre maestro malo manera mano manta manzana mapa mar martes martillo marzo mayo
medio mejor menos mentira mercado mesa mesero miedo miel mientras mil mirar mismo mochila mojado
momento mono morado morir mosca moto mucho muerte mujer mundo museo muy nacer nada nadar nadie
naranja nariz necesitar negro nieve noche nombre norte nota noventa noviembre nube nueve nuevo
nunca ochenta ocho octubre oeste ojo olvidar once oreja oro oscuro oso otro oveja padre pagar
palabra paloma pan pantalones papel para parque parte pasillo pastel patata pato paz pedir peine
pelo pelota pensar pera perder perro pescado pez piedra piel pierna pimienta piso planta plata
plato playa plaza pluma pobre poco poder pollo poner por porque postre precio pregunta preguntar
primavera primero primo pronto pueblo puente puerta punto quemar querer queso quince regalo reina
reloj responder rey rico rodilla rojo romper ropa rosa rueda ruido saber sacar sala salir saltar
salud sangre seco segundo seis selva semana sentir septiembre serpiente sesenta setenta siempre
siete silla sobre sol soldado sombra sombrero sopa sucio suelo sur tarde taza techo temprano
tenedor tener terminar tiempo tienda tierra tigre tijeras toalla tocar todo tomar tomate tonto
tormenta toro trabajar trabajo traer tranquilo trece treinta tren tres triste uno usted uva vaca
vacaciones vaso veinte vela vender ventana ver verano verdad verde vestido viejo viento viernes
vino vivir volar volver voz yo zanahoria zapato zorro
""".split())

WORDS_ES_ACCENTED: tuple[str, ...] = tuple("""
además adiós águila alemán algodón allí almacén año aquí araña árbitro árbol atún autobús avión
azúcar balcón baño bebé botón brócoli brújula búho cajón cámara camarón camión canción cárcel
champiñón ciempiés cigüeña cómo compañero corazón cuándo cuánto cumpleaños delfín después detrás día
difícil dueño español está estación fácil frío fútbol habitación imán jabón jamás jamón japonés
jardín ladrón lágrima lámpara lápiz lección limón maíz mañana médico melocotón miércoles montaña
murciélago música niña niño número océano país pájaro pantalón película pequeño pétalo pingüino
plátano policía quién quizás raíz rápido ratón razón río sábado sábana sandía sartén según señor
señora sillón sueño también teléfono tía tiburón tío túnel último uña vergüenza
""".split())
